"""Simulated time: each node's compute speed, each link's latency, and how long a sync round takes.

Why a model of time at all: with a round barrier one slow device sets the pace of the whole
network, and an asynchronous network does not wait for it; comparing the two needs time,
not rounds, on the x-axis. Time is simulated, not measured, so a run is reproducible by
seed on any machine. The unit is a median node's local update.

What holds: node ``i`` needs ``compute[i]`` per local update, log-normal around 1 with
``sim.speed_sigma``, times :data:`SLOW_FACTOR` for a seeded ``sim.slow`` fraction of the nodes.
A message from ``j`` to ``i`` takes ``latency[i, j]``, ``sim.latency`` times a seeded factor
in [0.5, 1.5], capped at half the sender's update time. Why the cap: then a sender's message
has arrived everywhere before its next one leaves, so a receiver always holds one of the
sender's last two states (:mod:`p2prec.sim.events` keeps exactly those two).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import scipy.sparse as sp

from p2prec.config import ConfigError, SimConfig
from p2prec.rng import Stream, seeded_rng

SLOW_FACTOR = 10.0
"""How much slower the ``sim.slow`` nodes are."""


class NodeClock:
    """The seeded speeds and latencies of ``n`` flat nodes on ``graph`` (see the module docstring)."""

    def __init__(self, cfg: SimConfig, graph: nx.Graph, n: int, seed: int) -> None:
        rng = seeded_rng(seed, Stream.CLOCK)
        self.compute = rng.lognormal(0.0, cfg.speed_sigma, n)
        self.slow = np.zeros(n, dtype=bool)
        self.slow[rng.permutation(n)[:round(cfg.slow * n)]] = True
        self.compute[self.slow] *= SLOW_FACTOR
        edges = np.asarray([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)
        receivers = np.concatenate([edges[:, 0], edges[:, 1]])
        senders = np.concatenate([edges[:, 1], edges[:, 0]])
        delay = cfg.latency * rng.uniform(0.5, 1.5, len(senders))
        delay = np.minimum(delay, 0.5 * self.compute[senders])
        self.latency = sp.csr_matrix((delay, (receivers, senders)), shape=(n, n))
        self.max_latency = float(delay.max()) if len(delay) else 0.0
        self.min_latency = float(delay.min()) if len(delay) else math.inf

    def sync_round(self, exchanges: int, deadline: float) -> float:
        """How long one sync round lasts: the slowest update (or the deadline), then each exchange's slowest link."""
        return (deadline or float(self.compute.max())) + exchanges * self.max_latency

    def period(self, deadline: float) -> np.ndarray:
        """Under a deadline, every how many rounds each node completes an update (1 without one)."""
        if not deadline:
            return np.ones(len(self.compute), dtype=np.int64)
        return np.ceil(self.compute / deadline).astype(np.int64)

    def lookahead(self) -> float:
        """A window in which no message sent can also arrive: the shortest link latency."""
        if not self.min_latency > 0:
            raise ConfigError("sim.latency: asynchronous simulation needs links with a latency > 0")
        return self.min_latency
