"""What keeping freed memory in the process (:mod:`p2prec.allocator`) saves the simulator.

Side by side in one run, two child processes on the quality run's own workload (all
federated ML-100K nodes, the default config): one with glibc's defaults
(``P2PREC_KEEP_FREED_MEMORY=0``), one with large blocks served from a heap that is never
trimmed. Each child times ``--rounds`` simulator rounds (after one untimed warm-up round)
and ``--repeats`` (default 7) evaluations under both protocols, and counts the minor page faults
(pages the kernel had to zero-fill) per round. Reported: medians, and the ratios
default / kept. The children alternate (default, kept, kept, default, ...) so that a
machine getting slower or faster during the run does not favour either.

Run: ``python benchmarks/bench_allocator.py [--data-dir DIR] [--set k=v] [--threads N] [--rounds 5] [--pairs 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, setup  # noqa: E402

from p2prec.allocator import ENV, keep_freed_memory  # noqa: E402
from p2prec.learn.evaluate import evaluate  # noqa: E402
from p2prec.run.data import select_nodes  # noqa: E402
from p2prec.sim.engine import Simulation  # noqa: E402
from p2prec.sim.runner import build_topology  # noqa: E402


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args: argparse.Namespace) -> dict:
    """Time rounds and evaluations in this process, under the allocator setting of its env."""
    kept = keep_freed_memory()
    cfg, data, backbone = setup(args)
    sim = Simulation(cfg, data, backbone, build_topology(cfg, len(select_nodes(data, cfg))))
    sim.step(1)
    rounds, faults = [], []
    for rnd in range(2, 2 + args.rounds):
        before, start = minor_faults(), time.perf_counter()
        sim.step(rnd)
        rounds.append(time.perf_counter() - start)
        faults.append(minor_faults() - before)
    evals = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        evaluate(sim.model, sim.pop.params, sim.eval_set, ("sampled", "full"), stacked=True, k=cfg.eval.k)
        evals.append(time.perf_counter() - start)
    return {"kept": kept, "round_s": statistics.median(rounds), "eval_s": statistics.median(evals),
            "faults_per_round": statistics.median(faults),
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_child(argv: list[str], keep: bool) -> dict:
    env = {**os.environ, ENV: "1" if keep else "0"}
    out = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--child", action="store_true", help="internal: measure in this process, print one JSON line")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = list(sys.argv[1:])
    results: dict[bool, list[dict]] = {False: [], True: []}
    for pair in range(args.pairs):
        for keep in ((False, True) if pair % 2 == 0 else (True, False)):
            results[keep].append(run_child(argv, keep))
    rows = {keep: {key: statistics.median(r[key] for r in rs) for key in ("round_s", "eval_s", "faults_per_round",
                                                                            "max_rss_gb")}
            for keep, rs in results.items()}
    if not all(r["kept"] for r in results[True]):
        print("note: this libc has no mallopt, so both children ran with its defaults")
    print(f"{'allocator':<22}{'round s':>10}{'eval s':>10}{'faults/round':>15}{'max RSS GB':>12}")
    for keep, label in ((False, "glibc defaults"), (True, "freed memory kept")):
        r = rows[keep]
        print(f"{label:<22}{r['round_s']:>10.3f}{r['eval_s']:>10.3f}{r['faults_per_round']:>15,.0f}{r['max_rss_gb']:>12.2f}")
    print(f"ratio default/kept: round {rows[False]['round_s'] / rows[True]['round_s']:.2f}x, "
          f"evaluation {rows[False]['eval_s'] / rows[True]['eval_s']:.2f}x; minor page faults per round "
          f"{rows[False]['faults_per_round']:,.0f} -> {rows[True]['faults_per_round']:,.0f}")


if __name__ == "__main__":
    main()
