"""Each round's mixing as sparse matrices, built from the topology and that round's faults.

A round maps the nodes' shared adapters ``X`` to ``A @ X_sent + diag(d) @ X``: ``X_sent``
is what the nodes sent (stale rows for late stragglers), ``A`` holds the weights of what
arrived, renormalised over the senders that were heard, and ``d`` is each node's weight on
its own current state. Flat topologies use Metropolis-Hastings (or sampled peers); an edge
hierarchy composes up (sample-count-weighted average at each aggregator), across (gossip
between aggregators) and down (each client takes its aggregator's result).

Late joiners (``sim.join``, :class:`JoinPlan`) are absent until their round: they neither
train nor send nor receive, exactly like a node that is down. At its round a joiner asks
one present neighbour for its shared adapter and starts from it (``sim.join_mode =
"neighbour"``), or starts from a fresh one (``"zero"``), which is what a node without the
join request would do. ``"present"`` is the control arm: the same cohort, drawn and measured
the same way, but present from round 1, so a joiner is compared with the same users had they
never been away (a cohort of 38 users differs from the founders by more than any start does).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import scipy.sparse as sp

from p2prec.config import ConfigError, GossipConfig, SimConfig
from p2prec.gossip.aggregate import aggregator_mixing
from p2prec.gossip.rounds import FlatMixing
from p2prec.gossip.mixing import (
    count_weighted_rows,
    drop_messages,
    freeze_rows,
    row_normalise,
    row_normalise_rect,
    silence_senders,
)
from p2prec.rng import Stream, seeded_rng
from p2prec.sim.faults import RoundFaults
from p2prec.topology import aggregators
from p2prec.topology.roles import AGGREGATOR_ONLY


@dataclass
class RoundMixing:
    """``new = A @ sent + d * own``, plus how many messages were sent this round and how many
    of them reached a node that was up (``received``: lost and dropped ones were sent only).

    ``factors`` multiply to ``A`` (one matrix for flat topologies; down, across and up for a
    hierarchy, which :func:`p2prec.gossip.mixing.mix` applies one after the other), plus
    ``diag(echo)`` when ``echo`` is set: a uniform average is applied as a rank-one product
    (column sums, then broadcast), whose diagonal ``echo`` takes back out of ``A``.
    """

    factors: tuple[sp.csr_matrix, ...]
    d: np.ndarray
    messages: int
    echo: np.ndarray | None = None
    received: int = 0

    @property
    def a(self) -> sp.csr_matrix:
        """``A`` as one matrix, for rules that need each node's whole row (robust aggregation)."""
        product = self.factors[0]
        for factor in self.factors[1:]:
            product = product @ factor
        if self.echo is not None:
            product = product + sp.diags(self.echo)
        return sp.csr_matrix(product)


def split_diagonal(w: sp.csr_matrix) -> RoundMixing:
    """Separate a square mixing matrix into its off-diagonal part and its diagonal.

    A uniform average (Metropolis weights on a complete graph with every message heard)
    becomes a rank-one product instead: at 754 nodes the dense product over the stacked
    adapters and trackers took about 8 s a round; column sums take milliseconds.
    """
    d = w.diagonal().copy()
    n = w.shape[0]
    if n > 1 and w.nnz == n * n and np.allclose(w.data, 1.0 / n, rtol=1e-9, atol=0.0):
        ones = sp.csr_matrix(np.ones((n, 1)))
        mean = sp.csr_matrix(np.full((1, n), 1.0 / n))
        return RoundMixing((ones, mean), d, 0, echo=-d)
    a = sp.csr_matrix(w - sp.diags(d))
    a.eliminate_zeros()
    return RoundMixing((a,), d, 0)


class MixingPlan:
    """Static structure of who mixes with whom; :meth:`round` applies one round's faults."""

    def __init__(self, graph: nx.Graph | None, n: int, counts: np.ndarray, cfg: GossipConfig, seed: int) -> None:
        self.n = n
        self.cfg = cfg
        self.counts = counts
        self.aggs = aggregators(graph) if graph is not None else []
        if graph is None:
            self.kind = "none"
        elif self.aggs:
            self.kind = "hierarchy"
            self._init_hierarchy(graph)
        else:
            self.kind = "flat"
            self.flat = FlatMixing(graph.subgraph(range(n)), cfg, seed)

    def _init_hierarchy(self, graph: nx.Graph) -> None:
        index = {a: k for k, a in enumerate(self.aggs)}
        home = np.full(self.n, -1)
        for node in range(self.n):
            if node in index:
                home[node] = index[node]
            else:
                home[node] = index[graph.nodes[node]["aggregator"]]
        self.home = home
        agg_is_data = np.asarray([graph.nodes[a].get("role") != AGGREGATOR_ONLY for a in self.aggs])
        self.agg_mixing = aggregator_mixing(graph, self.aggs)
        members = [np.flatnonzero(home == k) for k in range(len(self.aggs))]
        self.up = count_weighted_rows(members, self.counts, self.n)
        self.up_cols = self.up.indices.copy()
        up_rows = np.repeat(np.arange(len(self.aggs)), np.diff(self.up.indptr))
        aggs = np.asarray(self.aggs)
        # An aggregator that holds data is its own member: that contribution never crosses the network.
        self.own_entry = agg_is_data[up_rows] & (aggs[up_rows] == self.up_cols)
        self.is_own_agg = agg_is_data[home] & (aggs[home] == np.arange(self.n))

    def round(self, rnd: int, faults: RoundFaults, exchange: int = 0) -> RoundMixing:
        """Exchange ``exchange`` of round ``rnd`` under the round's faults (each exchange
        draws its own message drops from ``faults.rng``)."""
        if self.kind == "none":
            return RoundMixing((sp.csr_matrix((self.n, self.n)),), np.ones(self.n), 0)
        if self.kind == "flat":
            return self._flat(rnd, exchange, faults)
        return self._hierarchy(faults)

    def _flat(self, rnd: int, exchange: int, f: RoundFaults) -> RoundMixing:
        w = self.flat.round(rnd, exchange)
        messages = _count_sent(w, ~f.down)
        w = silence_senders(w, f.down | f.lost)
        w = drop_messages(w, f.drop_prob, f.rng) if f.drop_prob else w
        w = freeze_rows(w, f.down)
        w.eliminate_zeros()
        received = _count_sent(w, np.ones(self.n, dtype=bool))
        mixing = split_diagonal(row_normalise(w))
        mixing.messages, mixing.received = messages, received
        return mixing

    def _hierarchy(self, f: RoundFaults) -> RoundMixing:
        m = len(self.aggs)
        cols = self.up_cols
        heard = ~(f.down | f.lost)[cols] & (self.own_entry | (f.rng.random(len(cols)) >= f.drop_prob))
        up = sp.csr_matrix(self.up, copy=True)
        up.data = np.where(heard, up.data, 0.0)
        up.eliminate_zeros()
        up = row_normalise_rect(up)
        silent = np.diff(up.indptr) == 0
        across = silence_senders(self.agg_mixing, silent)
        across = drop_messages(across, f.drop_prob, f.rng) if f.drop_prob else across
        across = row_normalise(freeze_rows(across, silent))
        down = ~f.down & ~silent[self.home]
        is_own_agg = self.is_own_agg
        delivered = down & (is_own_agg | (f.rng.random(self.n) >= f.drop_prob))
        pick = sp.csr_matrix((np.ones(int(delivered.sum())), (np.flatnonzero(delivered), self.home[delivered])),
                             shape=(self.n, m))
        messages = int((~f.down & ~is_own_agg).sum()) + int(across.nnz - (across.diagonal() != 0).sum()) \
            + int((~f.down & ~silent[self.home] & ~is_own_agg).sum())
        received = int((heard & ~self.own_entry).sum()) + int(across.nnz - (across.diagonal() != 0).sum()) \
            + int((delivered & ~is_own_agg).sum())
        return RoundMixing((pick, across, up), (~delivered).astype(np.float64), messages, received=received)


def _count_sent(w: sp.csr_matrix, sending: np.ndarray) -> int:
    """Off-diagonal entries of ``w`` whose sender (column) is ``sending``: one message each."""
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    return int(((rows != w.indices) & sending[w.indices]).sum())



@dataclass(frozen=True)
class JoinCohort:
    """The nodes ``nodes`` that join at round ``round``; absent before it."""

    round: int
    nodes: np.ndarray


def parse_join(text: str, n: int) -> tuple[int, int]:
    """``ROUND:COUNT`` or ``ROUND:PERCENT%`` as (round, how many of the ``n`` nodes join then)."""
    try:
        round_text, size_text = text.split(":")
        round_ = int(round_text)
        count = round(n * float(size_text[:-1]) / 100) if size_text.endswith("%") else int(size_text)
    except ValueError:
        raise ConfigError(f"sim.join: {text!r} is not ROUND:COUNT or ROUND:PERCENT% (e.g. 100:5%)") from None
    if round_ < 2 or not 1 <= count < n:
        raise ConfigError(f"sim.join: {text!r} must name a round >= 2 and between 1 and {n - 1} of the {n} nodes")
    return round_, count


class JoinPlan:
    """Which nodes join late, and when; drawn once from the run seed, no node in two cohorts.

    Why from round 2: a node that joins at round 1 is simply a node of the network.
    """

    def __init__(self, cfg: SimConfig, n: int, seed: int) -> None:
        self.mode = cfg.join_mode
        self.window = cfg.join_window
        parsed = [parse_join(text, n) for text in cfg.join]
        total = sum(count for _, count in parsed)
        if total >= n:
            raise ConfigError(f"sim.join: {total} joiners leave no node to start the network ({n} nodes)")
        order = seeded_rng(seed, Stream.JOIN).permutation(n)
        self.cohorts: list[JoinCohort] = []
        start = 0
        for round_, count in parsed:
            self.cohorts.append(JoinCohort(round_, np.sort(order[start:start + count])))
            start += count
        self.seed = seed
        self.n = n

    def absent(self, rnd: int) -> np.ndarray:
        """Nodes that have not joined yet in round ``rnd`` (none in the ``present`` arm)."""
        out = np.zeros(self.n, dtype=bool)
        for cohort in self.cohorts if self.mode != "present" else ():
            if rnd < cohort.round:
                out[cohort.nodes] = True
        return out

    def joining(self, rnd: int) -> np.ndarray:
        """Nodes that join at the start of round ``rnd`` (sorted ids; empty for most rounds and
        in the ``present`` arm, whose cohort never left)."""
        found = [c.nodes for c in self.cohorts if c.round == rnd and self.mode != "present"]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def founders(self) -> np.ndarray:
        """Nodes present from round 1: the network the joiners are compared with."""
        out = np.ones(self.n, dtype=bool)
        for cohort in self.cohorts:
            out[cohort.nodes] = False
        return out

    def sources(self, rnd: int, graph: nx.Graph | None, present: np.ndarray) -> dict[int, int]:
        """For each node joining in ``rnd``, the present neighbour it takes its shared adapter
        from (a seeded choice); a joiner with no present neighbour is left out and starts fresh."""
        if self.mode == "zero" or graph is None:
            return {}
        rng = seeded_rng(self.seed, rnd, Stream.JOIN)
        chosen: dict[int, int] = {}
        for node in self.joining(rnd).tolist():
            options = sorted(j for j in graph.neighbors(node) if j < self.n and present[j])
            if options:
                chosen[node] = options[int(rng.integers(len(options)))]
        return chosen
