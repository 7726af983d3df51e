"""Convergence plots: validation and test NDCG@10 (and HR@10) against round, one line per run.

Why mark the best-validation round: readers must see that the reported test score was
read where validation peaked, not at the test curve's own maximum.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_convergence(runs: dict[str, list[dict]], out: Path, protocol: str = "sampled",
                     best_rounds: dict[str, int] | None = None) -> Path:
    """Write a two-panel PNG (NDCG@10, HR@10 against round) for one or more runs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, records in runs.items():
        rounds = [r["round"] for r in records]
        for ax, metric in zip(axes, ("ndcg@10", "hr@10")):
            val = [r["val"][protocol][metric] for r in records]
            test = [r["test"][protocol][metric] for r in records]
            (line,) = ax.plot(rounds, val, label=f"{label} (val)")
            ax.plot(rounds, test, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{label} (test)")
            best = (best_rounds or {}).get(label)
            if best is not None:
                ax.axvline(best, color=line.get_color(), linestyle=":", alpha=0.6)
    for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} ({protocol} protocol)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("dotted: best-validation round (test read there)", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out
