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
    """``folder/join.jsonl``, in round order; a clear error if it is missing, damaged or empty."""
    path = folder / "join.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run p2prec-sim with --set sim.join=ROUND:SHARE and --out {folder})")
    try:
        records = [_checked(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a join log of p2prec-sim ({type(exc).__name__}: {exc})") from None
    if not records:
        raise ValueError(f"{path}: no joiner measurements")
    return sorted(records, key=lambda r: r["round"])


def _checked(record: dict) -> dict:
    """``record``, once every field the report reads is there with the right type."""
    scores = [_score(record, group, split) for group in ("joiners", "founders") for split in ("val", "test")]
    if not all(isinstance(record[key], int) for key in ("round", "rounds_joined")) or \
            any(score != score for score in scores):
        raise ValueError("a round that is not an integer, or a score that is NaN")
    return record


def _score(record: dict, group: str, split: str) -> float:
    return float(record[group][split][METRIC])


def _mean(records: list[dict], group: str, split: str) -> float:
    return sum(_score(r, group, split) for r in records) / len(records)


def report(runs: dict[str, list[dict]], reference: str, first: int = 10) -> str:
    """A markdown table, one row per run: the cohort's mean validation and test NDCG@10 over its
    first ``first`` rounds, the test difference from the ``reference`` run's cohort over the
    same rounds, the founders' means, and the first round after joining at which the cohort's
    test score reached the reference's (and the founders') in the same round."""
    if reference not in runs:
        raise ValueError(f"reference run {reference!r} is not among {', '.join(runs)}")
    ref = {r["round"]: _score(r, "joiners", "test") for r in runs[reference]}
    lines = [f"| run | cohort val {METRIC}, first {first} rounds | cohort test | test minus {reference} | "
             f"founders' val / test | rounds to reach {reference} | rounds to reach the founders |",
             "|---|---|---|---|---|---|---|"]
    for name, log in runs.items():
        if any(r["round"] not in ref for r in log):
            raise ValueError(f"run {name!r} measured rounds that {reference!r} did not: not the same schedule")
        head = log[:first]
        gap = sum(_score(r, "joiners", "test") - ref[r["round"]] for r in head) / len(head)
        to_ref = next((r["rounds_joined"] for r in log if _score(r, "joiners", "test") >= ref[r["round"]]), None)
        to_founders = next((r["rounds_joined"] for r in log
                            if _score(r, "joiners", "test") >= _score(r, "founders", "test")), None)
        lines.append(f"| {name} | {_mean(head, 'joiners', 'val'):.4f} | {_mean(head, 'joiners', 'test'):.4f} | "
                     f"{gap:+.4f} | {_mean(head, 'founders', 'val'):.4f} / {_mean(head, 'founders', 'test'):.4f} | "
                     f"{to_ref or 'never'} | {to_founders or 'never'} |")
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
