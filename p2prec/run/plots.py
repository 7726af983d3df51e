"""Convergence plots: validation and test NDCG@10 (and HR@10) against round, one line per run.

Why mark the best-validation round: readers must see that the reported test score was
read where validation peaked, not at the test curve's own maximum.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from p2prec.atomic import write_bytes_atomic  # noqa: E402


def plot_convergence(runs: dict[str, list[dict]], out: Path, protocol: str = "sampled",
                     best_rounds: dict[str, float] | None = None, x: str = "round") -> Path:
    """Write a two-panel PNG (NDCG@10, HR@10 against ``x``, a record key: ``round`` or
    ``sim_time``) for one or more runs; ``best_rounds`` are marked in the same unit."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, records in runs.items():
        rounds = [r[x] for r in records]
        for ax, metric in zip(axes, ("ndcg@10", "hr@10")):
            val = [r["val"][protocol][metric] for r in records]
            test = [r["test"][protocol][metric] for r in records]
            (line,) = ax.plot(rounds, val, label=f"{label} (val)")
            ax.plot(rounds, test, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{label} (test)")
            best = (best_rounds or {}).get(label)
            if best is not None:
                ax.axvline(best, color=line.get_color(), linestyle=":", alpha=0.6)
    for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
        ax.set_xlabel("simulated time (median local updates)" if x == "sim_time" else x)
        ax.set_ylabel(f"{metric} ({protocol} protocol)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"dotted: best-validation {'round' if x == 'round' else 'time'} (test read there)", fontsize=9)
    return _save(fig, out)


def plot_utility_vs_epsilon(private: dict[float, float], clean: float | None, out: Path,
                            protocol: str = "sampled") -> Path:
    """Test NDCG@10 at the best-validation round against each run's epsilon (log scale).

    Why a separate plot: the privacy question is "what does a given epsilon cost?", which a
    per-round overlay cannot answer. ``clean`` (a run without privacy) is drawn as a line.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    eps = sorted(private)
    ax.plot(eps, [private[e] for e in eps], marker="o", label="local DP")
    if clean is not None:
        ax.axhline(clean, color="gray", linestyle="--", label="no privacy")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("epsilon per node over the run (delta 1e-5)")
    ax.set_ylabel(f"test NDCG@10 ({protocol} protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it atomically, so a crash never leaves half a PNG."""
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    return write_bytes_atomic(out, png.getvalue())
