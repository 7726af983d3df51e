"""Late joiners across runs: how each start compares with the same users had they never left.

Why its own command: one run can only compare its joiners with its founders, and a cohort of
5% of ML-100K's nodes (38 users) has a standard error of about 0.065 in NDCG@10, larger than
anything a join start changes. Runs that differ only in ``sim.join_mode`` draw the same cohort
from ``run.seed``, so their ``join.jsonl`` files can be compared round by round on the same
users; the ``present`` arm (the cohort there from round 1) is what "the network's level" is
for those users. The first-10-rounds mean is the one each run's ``summary.json`` reports.

    python -m p2prec.run.joins present=runs/join-present neighbour=runs/join-neighbour zero=runs/join-zero
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRIC = "ndcg@10"


def read_join_log(folder: Path) -> list[dict]:
    """``folder/join.jsonl``, in round order; a clear error if the run measured no joiners."""
    path = folder / "join.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run p2prec-sim with --set sim.join=ROUND:SHARE and --out {folder})")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no joiner measurements")
    return sorted(records, key=lambda r: r["round"])


def _test(record: dict, group: str) -> float:
    return record[group]["test"][METRIC]


def report(runs: dict[str, list[dict]], reference: str, first: int = 10) -> str:
    """A markdown table, one row per run: the cohort's mean test NDCG@10 over its first ``first``
    rounds, the difference from the ``reference`` run's cohort over the same rounds, the
    founders' mean, and the first round after joining at which the cohort reached the reference
    (and the founders) in the same round."""
    if reference not in runs:
        raise ValueError(f"reference run {reference!r} is not among {', '.join(runs)}")
    ref = {r["round"]: _test(r, "joiners") for r in runs[reference]}
    lines = [f"| run | cohort test {METRIC}, first {first} rounds | minus {reference} | founders' | "
             f"rounds to reach {reference} | rounds to reach the founders |", "|---|---|---|---|---|---|"]
    for name, log in runs.items():
        rounds = [r for r in log if r["round"] in ref]
        if len(rounds) != len(log):
            raise ValueError(f"run {name!r} measured rounds that {reference!r} did not: not the same schedule")
        head = rounds[:first]
        cohort = sum(_test(r, "joiners") for r in head) / len(head)
        gap = sum(_test(r, "joiners") - ref[r["round"]] for r in head) / len(head)
        founders = sum(_test(r, "founders") for r in head) / len(head)
        to_ref = next((r["rounds_joined"] for r in rounds if _test(r, "joiners") >= ref[r["round"]]), None)
        to_founders = next((r["rounds_joined"] for r in rounds if _test(r, "joiners") >= _test(r, "founders")), None)
        lines.append(f"| {name} | {cohort:.4f} | {gap:+.4f} | {founders:.4f} | {to_ref or 'never'} | "
                     f"{to_founders or 'never'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2prec.run.joins", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=FOLDER", help="a results folder of p2prec-sim, named")
    parser.add_argument("--reference", default="present",
                        help="the run whose cohort the others are measured against (default: present)")
    args = parser.parse_args(argv)
    try:
        runs = {}
        for item in args.runs:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"{item!r} is not NAME=FOLDER")
            runs[name] = read_join_log(Path(folder))
        print(report(runs, args.reference))
    except ValueError as exc:
        print(f"python -m p2prec.run.joins: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
