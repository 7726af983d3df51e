# `make demo` and `make test` both create .venv on first use: torch==2.13.0 first (the CPU
# build, so pip never pulls a multi-GB CUDA torch), then the package with its dev extra.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where MovieLens lives: DATA=DIR on the command line, else $P2PREC_DATA, else the user cache
# (`make demo` downloads ML-100K there, checksum verified, when it is missing).
DATA ?= $(or $(P2PREC_DATA),$(HOME)/.cache/p2prec/data)

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	@test -f $(DATA)/ml-100k/u.data || $(BIN)/p2prec data download ml-100k --dest $(DATA)
	$(BIN)/p2prec-sim --data-dir $(DATA) --topology small-world --out runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_local_step.py --data-dir $(DATA)
	$(BIN)/python benchmarks/bench_sim.py --data-dir $(DATA)
	$(BIN)/python benchmarks/bench_wire.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_rounds.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) runs
