"""Serving latency: the whole ``p2prec recommend`` command, and one user's answer once loaded.

Two figures, both medians, against the bounds serving must meet on 2 cores:

* command: ``p2prec recommend --state DIR --user U`` run as a fresh process, start-up
  (importing torch and transformers), the data set, the backbone and the state included
  (bound: 10 s). Its CPU time is printed beside the wall time: on a machine that others
  load, the wall time grows with their load and the CPU time does not;
* answer: :meth:`p2prec.serve.recommend.Recommender.recommend` for one user after
  :meth:`~p2prec.serve.recommend.Recommender.open`, taking users of different nodes in turn,
  so each answer also loads that node's checkpoint (bound: 50 ms), with its CPU time likewise.

``--state DIR`` measures a saved state (``p2prec-sim --save-states``); without it, every
node's untrained adapters are saved in a temporary state folder first: what serving costs
does not depend on the adapters' values.

Run: ``python benchmarks/bench_serve.py --data-dir DIR [--state DIR] [--users N] [--repeats N]``.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parser, setup

from p2prec.learn.factories import adapter_model
from p2prec.learn.population import stack
from p2prec.run.data import select_nodes
from p2prec.serve.recommend import Recommender
from p2prec.serve.state import fingerprint, save_states

COMMAND_BOUND_S = 10.0
ANSWER_BOUND_MS = 50.0


def untrained_state(folder: Path, args) -> Path:  # noqa: ANN001 - argparse namespace
    """A state folder holding every node's initial adapters, on the configured (cached) backbone."""
    cfg, data, backbone = setup(args)
    backbone_sha = fingerprint(backbone)
    model = adapter_model(backbone, cfg)
    nodes = select_nodes(data, cfg)
    return save_states(folder, cfg, data, stack(model.trainable_state(), len(nodes)), nodes, 0, None, backbone_sha)


def command_s(state: Path, user: int, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system) of the whole command in a fresh process."""
    script = Path(sys.executable).with_name("p2prec")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "p2prec.cli"]
    cmd += ["recommend", "--state", str(state), "--user", str(user)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"bench_serve: the command failed: {done.stderr.strip()}")
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--state", help="a saved state folder (default: every node's untrained adapters)")
    p.add_argument("--users", type=int, default=50, help="users answered in-process")
    args = p.parse_args()
    scratch = None
    if args.state:
        state = Path(args.state)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        state = untrained_state(scratch / "state", args)
    try:
        start = time.perf_counter()
        served = Recommender.open(state)
        open_s = time.perf_counter() - start
        users = served.users[:: max(1, len(served.users) // args.users)][: args.users]
        answers, answer_cpus = [], []
        for user in users:
            start, cpu = time.perf_counter(), time.process_time()
            served.recommend(user)
            answers.append(time.perf_counter() - start)
            answer_cpus.append(time.process_time() - cpu)
        answer_ms, answer_cpu_ms = 1000 * statistics.median(answers), 1000 * statistics.median(answer_cpus)
        whole_s, whole_cpu_s = command_s(state, users[0], args.repeats)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"state: {state if args.state else 'untrained adapters of every node'}, {len(served.users)} users")
    print(f"p2prec recommend, whole command:  median {whole_s:.2f} s over {args.repeats} runs, CPU "
          f"{whole_cpu_s:.2f} s (bound {COMMAND_BOUND_S:.0f} s)")
    print(f"Recommender.recommend, loaded:    median {answer_ms:.1f} ms per user over {len(users)} users, CPU "
          f"{answer_cpu_ms:.1f} ms (bound {ANSWER_BOUND_MS:.0f} ms; opening took {open_s:.2f} s)")


if __name__ == "__main__":
    main()
