"""Mixing matrices and their fault masks: rows stay stochastic, the mean is preserved."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from p2prec.gossip.mixing import (
    consensus_distance,
    count_weighted_rows,
    drop_messages,
    freeze_rows,
    matching_matrix,
    mix,
    row_normalise,
    silence_senders,
    uniform_peer_matrix,
)
from p2prec.topology import build, metropolis_hastings


def _stacked(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 3, 4, generator=g), "b": torch.randn(n, 5, generator=g)}


def test_metropolis_mixing_preserves_the_network_mean() -> None:
    w = metropolis_hastings(build("small-world", 40, seed=1))
    x = _stacked(40)
    y = mix(w, x)
    for k in x:
        assert torch.allclose(x[k].mean(0), y[k].mean(0), atol=1e-6)
    assert consensus_distance(y) < consensus_distance(x)


def test_faults_keep_rows_stochastic_and_down_nodes_unchanged() -> None:
    w = metropolis_hastings(build("ring", 12))
    rng = np.random.default_rng(0)
    down = np.zeros(12, dtype=bool)
    down[[2, 7]] = True
    masked = row_normalise(freeze_rows(drop_messages(silence_senders(w, down), 0.5, rng), down))
    assert np.allclose(np.asarray(masked.sum(axis=1)).ravel(), 1.0)
    assert masked[2, 2] == 1.0 and masked[2].nnz == 1
    assert masked[:, 7].nnz == 1
    x = _stacked(12)
    y = mix(masked, x)
    assert torch.equal(y["a"][7], x["a"][7])


def test_a_node_that_heard_nothing_keeps_its_state() -> None:
    w = sp.csr_matrix(np.array([[0.0, 1.0], [0.5, 0.5]]))
    w = row_normalise(drop_messages(w, 1.0, np.random.default_rng(0)))
    assert np.allclose(w.toarray(), np.eye(2))


def test_peer_sampling_and_matching_are_stochastic() -> None:
    rng = np.random.default_rng(0)
    w = uniform_peer_matrix(20, 3, rng)
    assert np.allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
    assert np.allclose(w.diagonal(), 1.0 / (1.0 + np.asarray((w > 0).sum(axis=1)).ravel() - 1))
    edges = np.asarray(list(build("ring", 10).edges))
    m = matching_matrix(edges, 10, rng)
    assert np.allclose(m.toarray(), m.toarray().T) and np.allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0)


def test_count_weighted_rows_are_fedavg_weights() -> None:
    counts = np.array([1.0, 3.0, 2.0, 2.0])
    up = count_weighted_rows([np.array([0, 1]), np.array([2, 3])], counts, 4)
    assert np.allclose(up.toarray(), [[0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5]])
