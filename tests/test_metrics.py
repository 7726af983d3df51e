"""Metrics against hand-computed cases; ties count against the held-out item."""

from __future__ import annotations

import math

import numpy as np
import torch

from p2prec.learn.metrics import item_coverage, metrics_from_ranks, rank_of_first, summarize


def test_rank_counts_ties_against_the_held_out_item() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.9], [2.0, 1.0, 0.0, -1.0]])
    assert rank_of_first(scores).tolist() == [2, 0]


def test_rank_ignores_excluded_columns() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.8, 0.1]])
    valid = torch.tensor([[True, False, True, True]])
    assert rank_of_first(scores, valid).tolist() == [1]


def test_metrics_hand_computed() -> None:
    m = metrics_from_ranks(np.array([0, 1, 9, 10, 99]), k=10)
    assert m["hr@10"].tolist() == [1, 1, 1, 0, 0]
    expected_ndcg = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    assert np.allclose(m["ndcg@10"], expected_ndcg)
    assert np.allclose(m["mrr"], [1.0, 0.5, 0.1, 1 / 11, 0.01])


def test_summary_spread_is_over_nodes() -> None:
    per_user = {"ndcg@10": np.array([1.0, 0.0, 0.5, 0.5, 0.0])}
    s = summarize(per_user, node_of_user=np.array([0, 0, 1, 1, 2]))
    assert s["ndcg@10"] == 0.4
    assert s["spread"]["ndcg@10"]["mean"] == np.mean([0.5, 0.5, 0.0])
    assert s["spread"]["ndcg@10"]["p10"] == np.percentile([0.5, 0.5, 0.0], 10)


def test_item_coverage() -> None:
    assert item_coverage(np.array([[1, 2], [2, 3]]), n_items=6) == 0.5


def test_nan_scores_rank_last_not_first() -> None:
    """A diverged model (NaN scores) must score zero, not a perfect HR@10."""
    nan = float("nan")
    scores = torch.tensor([[nan, 0.1, 0.2], [0.5, nan, 0.1], [nan, nan, nan]])
    assert rank_of_first(scores).tolist() == [2, 1, 2]
