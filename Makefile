# Both targets create .venv on first use: torch==2.13.0 first (the CPU build), then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(P2PREC_DATA),$(P2PREC_DATA),../shared/data)

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/p2prec-sim --data-dir $(DATA) --topology small-world --out runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
