"""``p2prec report DIR [DIR...]``: a comparison table and an overlay plot of results folders."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from p2prec.run.folder import read_run
from p2prec.run.plots import plot_convergence, plot_utility_vs_epsilon


def table(folders: list[Path], protocol: str) -> str:
    """A Markdown table of test metrics at the best-validation round, one row per folder.

    The validation score that chose the round sits beside them, because on small data the two
    can disagree by more than the differences between runs, and a reader must see both.
    """
    other = "full" if protocol == "sampled" else "sampled"
    head = (f"| run | nodes | best round | val NDCG@10 | HR@10 | NDCG@10 | MRR | NDCG@10 node p10-p90 "
            f"| NDCG@10 ({other}) | bytes/node/round |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for folder in folders:
        summary, _ = read_run(folder)
        t = summary["test_at_best"][protocol]
        spread = t.get("spread", {}).get("ndcg@10", {})
        rows.append(f"| {summary.get('label') or folder.name} | {summary['nodes']} | {summary['best_round']} "
                    f"| {_metric(summary.get('val_at_best', {}).get(protocol))} "
                    f"| {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {t['mrr']:.4f} "
                    f"| {spread.get('p10', float('nan')):.3f}-{spread.get('p90', float('nan')):.3f} "
                    f"| {_metric(summary['test_at_best'].get(other))} "
                    f"| {summary['bytes_per_node_per_round']:.0f} |")
    return "\n".join(rows)


def _metric(scores: dict | None, name: str = "ndcg@10") -> str:
    """One score to four places, or ``-`` where the run did not evaluate that protocol."""
    value = (scores or {}).get(name)
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def consensus_table(folders: list[Path]) -> str | None:
    """Spectral gap, predicted and measured consensus rates, for runs that stopped training."""
    rows = ["| run | spectral gap | predicted rate | measured rate |", "|---|---|---|---|"]
    for folder in folders:
        summary, _ = read_run(folder)
        if summary.get("consensus_rate_measured") is None:
            continue
        rows.append(f"| {summary.get('label') or folder.name} | {summary.get('spectral_gap', float('nan')):.2e} "
                    f"| {summary.get('consensus_rate_predicted', float('nan')):.5f} "
                    f"| {summary['consensus_rate_measured']:.5f} |")
    return "\n".join(rows) if len(rows) > 2 else None


def trust_table(folders: list[Path], protocol: str) -> str | None:
    """Codec, traffic, privacy and attack settings beside the test scores; None when no run uses any.

    Runs written before these settings existed read as codec ``none``, no privacy and no attack.
    """
    rows = [f"| run | codec | bytes/node/round | epsilon (delta) | noise multiplier | rule | Byzantine "
            f"| evaluated nodes | HR@10 | NDCG@10 |\n|---|---|---|---|---|---|---|---|---|---|"]
    used = False
    for folder in folders:
        summary, _ = read_run(folder)
        codec, eps, rule = summary.get("codec", "none"), summary.get("epsilon"), summary.get("robust_rule", "mean")
        used |= codec != "none" or eps is not None or bool(summary.get("byzantine")) or rule != "mean"
        t = summary["test_at_best"][protocol]
        privacy = "-" if eps is None else f"{eps:.2f} ({summary['delta']:.0e})"
        sigma = "-" if summary.get("noise_multiplier") is None else f"{summary['noise_multiplier']:.2f}"
        attack = f"{summary['byzantine']} {summary['attack']}" if summary.get("byzantine") else "0"
        rows.append(f"| {summary.get('label') or folder.name} | {codec} | {summary['bytes_per_node_per_round']:.0f} "
                    f"| {privacy} | {sigma} | {rule} | {attack} | {summary.get('evaluated_nodes', summary['nodes'])} "
                    f"| {t['hr@10']:.4f} | {t['ndcg@10']:.4f} |")
    return "\n".join(rows) if used else None


def run(args: argparse.Namespace) -> int:
    folders = [Path(d) for d in args.dirs]
    try:
        print(f"test at the best-validation round, {args.protocol} protocol\n")
        print(table(folders, args.protocol))
        trust = trust_table(folders, args.protocol)
        if trust:
            print("\ncodecs, privacy and attacks (metrics over the honest nodes)\n")
            print(trust)
        consensus = consensus_table(folders)
        if consensus:
            print("\nconsensus after training stops (distance shrinks by this factor per round)\n")
            print(consensus)
        runs = {}
        best = {}
        for folder in folders:
            summary, records = read_run(folder)
            label = summary.get("label") or folder.name
            runs[label], best[label] = records, summary["best_round"]
        plot_convergence(runs, Path(args.plot), protocol=args.protocol, best_rounds=best)
        if args.epsilon_plot:
            epsilon_plot(folders, Path(args.epsilon_plot), args.protocol)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"p2prec report: error: {exc}", file=sys.stderr)
        return 2
    print(f"\noverlay plot: {args.plot}")
    if args.epsilon_plot:
        print(f"utility against epsilon: {args.epsilon_plot}")
    return 0


def epsilon_plot(folders: list[Path], out: Path, protocol: str) -> None:
    """Plot test NDCG@10 against epsilon for the private runs, beside the first run without privacy."""
    private: dict[float, float] = {}
    clean = None
    for folder in folders:
        summary, _ = read_run(folder)
        ndcg = summary["test_at_best"][protocol]["ndcg@10"]
        eps = summary.get("epsilon")
        if eps is not None and math.isfinite(eps):
            private[float(eps)] = ndcg
        elif eps is None and clean is None:
            clean = ndcg
    if not private:
        raise ValueError("--epsilon-plot: none of these runs has privacy on (no finite epsilon in summary.json)")
    plot_utility_vs_epsilon(private, clean, out, protocol)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="compare results folders: table and overlay plot")
    p.add_argument("dirs", nargs="+", help="results folders written by p2prec-sim")
    p.add_argument("--protocol", choices=("sampled", "full"), default="sampled")
    p.add_argument("--plot", default="report.png", help="overlay plot to write (PNG)")
    p.add_argument("--epsilon-plot", default="", help="also plot test NDCG@10 against epsilon for private runs (PNG)")
    p.set_defaults(func=run)
