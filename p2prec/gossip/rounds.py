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
from p2prec.gossip.mixing import matching_matrix, uniform_peer_matrix
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
    """

    def __init__(self, graph: nx.Graph, cfg: GossipConfig, seed: int) -> None:
        self.n = graph.number_of_nodes()
        self.cfg = cfg
        self.seed = seed
        self.base = metropolis_hastings(graph)
        self.edges = np.asarray([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)

    def round(self, rnd: int, exchange: int = 0) -> sp.csr_matrix:
        """The matrix of round ``rnd``'s exchange ``exchange`` (rows sum to one), the same
        wherever it is computed. Exchange 0 draws from (seed, round) alone, as a one-exchange
        round always has; later exchanges add their index to the draw's key."""
        if self.cfg.mixing == "metropolis":
            return self.base
        rng = seeded_rng(self.seed, rnd, Stream.PEER_DRAW, *exchange_key(exchange))
        if self.cfg.mixing == "matching":
            return matching_matrix(self.edges, self.n, rng)
        return uniform_peer_matrix(self.n, self.cfg.peers, rng)
