"""Which mixing matrix a flat topology uses in each round, before any fault.

Why one place: with time-varying peer sampling the matrix changes every round, and a real
node must draw exactly the simulator's draw without asking anyone. Both build a
:class:`FlatMixing` from the same data graph and gossip config, and the draw depends on
(``run.seed``, round) alone, so every node of a network, and the simulator, agree on
who talks to whom in round ``t``.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import scipy.sparse as sp

from p2prec.config import GossipConfig
from p2prec.gossip.mixing import hypercube_matrix, matching_matrix, uniform_peer_matrix
from p2prec.rng import Stream, seeded_rng
from p2prec.topology import metropolis_hastings


def exchange_key(exchange: int) -> tuple[int, ...]:
    """Seed keys that set an exchange's draws apart: none for exchange 0, so a round of one
    exchange draws exactly what it did before rounds had several (old runs reproduce)."""
    return (exchange,) if exchange else ()


class FlatMixing:
    """The rounds' mixing matrices on a flat topology over data nodes ``0..n-1``.

    ``metropolis``: the static Metropolis-Hastings weights every round. ``matching``: a
    random maximal matching of the topology's edges, matched pairs averaging. ``peers``:
    each node pushes to ``cfg.peers`` random nodes of the whole network (Epidemic Learning).
    ``hypercube``: exchange ``s`` (counted over all rounds' exchanges) pairs the nodes whose
    labels differ in bit ``s mod ceil(log2 n)`` (:func:`p2prec.gossip.mixing.hypercube_matrix`),
    one partner per exchange like ``matching``; the labels are a seeded permutation drawn
    anew each cycle through the bits, so a node without a partner (``n`` not a power of
    two) is a different one in each cycle. Only pairs that are edges of the topology talk.
    """

    def __init__(self, graph: nx.Graph, cfg: GossipConfig, seed: int) -> None:
        self.n = graph.number_of_nodes()
        self.cfg = cfg
        self.seed = seed
        self.base = metropolis_hastings(graph)
        self.edges = np.asarray([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)
        self.adjacency = nx.to_scipy_sparse_array(graph, nodelist=range(self.n), format="csr") \
            if cfg.mixing == "hypercube" else None
        self.bits = max(int(self.n - 1).bit_length(), 1)

    def round(self, rnd: int, exchange: int = 0) -> sp.csr_matrix:
        """The matrix of round ``rnd``'s exchange ``exchange`` (rows sum to one), the same
        wherever it is computed. Exchange 0 draws from (seed, round) alone, as a one-exchange
        round always has; later exchanges add their index to the draw's key."""
        if self.cfg.mixing == "metropolis":
            return self.base
        if self.cfg.mixing == "hypercube":
            step = (rnd - 1) * self.cfg.exchanges + exchange
            cycle, bit = divmod(step, self.bits)
            labels = seeded_rng(self.seed, cycle, Stream.PEER_DRAW).permutation(self.n)
            return hypercube_matrix(labels, bit, self.adjacency)
        rng = seeded_rng(self.seed, rnd, Stream.PEER_DRAW, *exchange_key(exchange))
        if self.cfg.mixing == "matching":
            return matching_matrix(self.edges, self.n, rng)
        return uniform_peer_matrix(self.n, self.cfg.peers, rng)
