"""Ranking metrics from the held-out item's rank, and their spread across nodes.

Why ranks: every protocol reduces to "how many candidates scored at least as high as the
held-out item" (ties count against it), and HR, NDCG and MRR are all functions of that.
"""

from __future__ import annotations

import numpy as np
import torch


def rank_of_first(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of column 0 among the columns of ``scores`` ``[U, C]``.

    Counts the other columns scoring at least as high (ties count against the held-out
    item). ``valid`` ``[U, C]`` excludes columns (e.g. items the user interacted with).
    A NaN score also counts against the held-out item, so a diverged model ranks last
    instead of looking perfect (NaN compares false with everything).
    """
    nan = scores.isnan()
    beats = (scores[:, 1:] >= scores[:, :1]) | nan[:, 1:] | nan[:, :1]
    if valid is not None:
        beats = beats & valid[:, 1:]
    return beats.sum(dim=1)


def metrics_from_ranks(ranks: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user HR@k, NDCG@k and MRR for 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < k
    return {
        f"hr@{k}": hit.astype(np.float64),
        f"ndcg@{k}": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0),
        "mrr": 1.0 / (ranks + 1.0),
    }


def summarize(per_user: dict[str, np.ndarray], node_of_user: np.ndarray) -> dict[str, object]:
    """Means over users, plus the spread of per-node means (mean, p10, p90) for each metric.

    The headline numbers average over users (as PFedRec and others report). The spread is
    over nodes, because a recommender that only serves the median node is not done.
    """
    out: dict[str, object] = {name: float(values.mean()) for name, values in per_user.items()}
    nodes, inverse = np.unique(node_of_user, return_inverse=True)
    spread: dict[str, dict[str, float]] = {}
    for name, values in per_user.items():
        per_node = np.bincount(inverse, weights=values, minlength=len(nodes)) / np.bincount(inverse)
        spread[name] = {
            "mean": float(per_node.mean()),
            "p10": float(np.percentile(per_node, 10)),
            "p90": float(np.percentile(per_node, 90)),
        }
    out["spread"] = spread
    return out


def item_coverage(top_items: np.ndarray, n_items: int) -> float:
    """Fraction of the catalogue that appears in at least one user's top-k list."""
    return float(len(np.unique(top_items[top_items > 0])) / n_items)
