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
    hypercube_matrix,
    matching_matrix,
    mix,
    row_normalise,
    silence_senders,
    uniform_peer_matrix,
)
from p2prec.config import GossipConfig
from p2prec.gossip.rounds import FlatMixing
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


def test_hypercube_gossip_averages_exactly_in_log2_n_exchanges() -> None:
    """16 nodes, two exchanges a round: after two rounds (four bits) every node holds the exact
    mean; each exchange is a symmetric perfect matching, and the draw is the same wherever made."""
    mixing = FlatMixing(build("complete", 16), GossipConfig(mixing="hypercube", exchanges=2), 3)
    assert mixing.bits == 4
    x = np.random.default_rng(0).normal(size=(16, 5))
    y = x.copy()
    for rnd in (1, 2):
        for exchange in (0, 1):
            w = mixing.round(rnd, exchange)
            assert np.allclose(w.toarray(), w.toarray().T) and np.allclose(w.sum(axis=1), 1.0)
            assert np.allclose(w.diagonal(), 0.5)  # every node has a partner
            assert (w != FlatMixing(build("complete", 16), mixing.cfg, 3).round(rnd, exchange)).nnz == 0
            y = w @ y
    assert np.allclose(y, x.mean(0), atol=1e-12)
    assert (mixing.round(1, 0) != mixing.round(3, 0)).nnz  # fresh labels in the next cycle


def test_hypercube_pairs_only_neighbours_and_existing_labels() -> None:
    """Six nodes on a ring: labels 6 and 7 do not exist and non-adjacent pairs stay apart."""
    ring = build("ring", 6)
    labels = np.arange(6)
    adjacency = sp.csr_matrix(np.asarray([[1.0 if ring.has_edge(i, j) else 0.0 for j in range(6)] for i in range(6)]))
    w = hypercube_matrix(labels, 0, adjacency).toarray()   # pairs (0,1), (2,3), (4,5): all ring edges
    assert np.allclose(w.diagonal(), 0.5)
    labels = np.array([0, 1, 2, 3, 5, 4])
    w = hypercube_matrix(labels, 2, adjacency).toarray()   # labels 0-4: nodes 0-5, an edge; 1-5: nodes 1-4, none
    assert np.allclose(w.diagonal(), [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]) and w[0, 5] == w[5, 0] == 0.5


def test_count_weighted_rows_are_fedavg_weights() -> None:
    counts = np.array([1.0, 3.0, 2.0, 2.0])
    up = count_weighted_rows([np.array([0, 1]), np.array([2, 3])], counts, 4)
    assert np.allclose(up.toarray(), [[0.25, 0.75, 0, 0], [0, 0, 0.5, 0.5]])
