"""Runs against simulated time: when each reached a validation score, and one plot of them all.

Why its own command: the question async gossip answers is "how soon", not "after how many
rounds", and rounds of a barrier, rounds under a deadline and asynchronous updates are not
comparable units. Every run with a simulated clock records ``sim_time`` in ``metrics.jsonl``
(:mod:`p2prec.sim.clock`); this reads those files, never the test scores, to decide times:
a target is a validation score, and the test score reported is the one at the run's own
best-validation record.

    python -m p2prec.run.timeline --out runs/async/time.png barrier=runs/async/barrier async=runs/async/async
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2prec.run.folder import best_record
from p2prec.run.plots import plot_convergence


def read_records(folder: Path) -> list[dict]:
    """``folder/metrics.jsonl``; a clear error if it is missing or has no simulated time."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run p2prec-sim with --out {folder} first)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records or any("sim_time" not in r for r in records):
        raise ValueError(f"{path}: records without sim_time (set sim.slow, sim.deadline or gossip.mode = 'async')")
    return records


def time_to(records: list[dict], target: float, protocol: str, metric: str) -> float | None:
    """The first simulated time at which validation ``metric`` reached ``target`` (None if never)."""
    return next((r["sim_time"] for r in records if r["val"][protocol][metric] >= target), None)


def report(runs: dict[str, list[dict]], protocol: str = "sampled", metric: str = "ndcg@10") -> str:
    """A markdown table: each run's best validation score, when, the test score there, and how
    soon it reached every other run's best validation score."""
    best = {name: best_record(records, protocol, metric) for name, records in runs.items()}
    head = f"| run | best val {metric} | at time | test {metric} there |" + \
        "".join(f" time to {name}'s best |" for name in runs)
    lines = [head, "|" + "---|" * (4 + len(runs))]
    for name, records in runs.items():
        b = best[name]
        reach = [time_to(records, best[other]["val"][protocol][metric], protocol, metric) for other in runs]
        lines.append(f"| {name} | {b['val'][protocol][metric]:.4f} | {b['sim_time']:.0f} | "
                     f"{b['test'][protocol][metric]:.4f} |"
                     + "".join(f" {'never' if t is None else f'{t:.0f}'} |" for t in reach))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2prec.run.timeline", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=FOLDER", help="a results folder of p2prec-sim, named")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--protocol", default="sampled")
    args = parser.parse_args(argv)
    try:
        pairs = [arg.split("=", 1) for arg in args.runs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("runs are given as NAME=FOLDER")
        runs = {name: read_records(Path(folder)) for name, folder in pairs}
        best = {name: best_record(r, args.protocol, "ndcg@10")["sim_time"] for name, r in runs.items()}
        plot_convergence(runs, args.out, args.protocol, best, x="sim_time")
    except (ValueError, KeyError) as exc:
        print(f"timeline: error: {exc}", file=sys.stderr)
        return 2
    print(report(runs, args.protocol))
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
