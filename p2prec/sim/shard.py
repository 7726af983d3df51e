"""One shard of a simulated population: a contiguous block of nodes on its own backbone.

Why shards: a population larger than one machine (or one that should use several cores)
is split into blocks of nodes, each holding one frozen backbone and its nodes' stacked
adapters and optimizer states (:class:`p2prec.learn.population.Population` with the
nodes' global ids, so every node draws the batches the in-process simulator draws for
it). A round runs the simulator's own pieces on each block: the local update, the round's
faults (:class:`p2prec.sim.faults.FaultPlan`) and mixing matrix
(:class:`p2prec.sim.plan.MixingPlan`), drawn from the seeds alone and so identical in every
shard, the norm bound (a :class:`p2prec.gossip.robust.NormBound` for the shard's rows, cuts included) and
the product of :func:`p2prec.gossip.mixing.mix`. Only the states that a neighbour in
another shard mixes travel (:class:`Packet`), with their norms for that neighbour's bound.

Where a shard runs is the backend's business (:mod:`p2prec.sim.backend`): in this process,
or in a Ray actor. With backbone dropout on, a node's dropout masks depend on which nodes
share its chunk (as they depend on ``sim.chunk`` in-process), so sharded and in-process
runs agree exactly only with ``train.backbone_dropout = false``; otherwise they are the
same process with other masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import Params, mix_into
from p2prec.gossip.robust import bounded_names, state_norms
from p2prec.gossip.stack import GossipStack
from p2prec.learn.factories import adapter_model, configured_population, federated_eval_set
from p2prec.learn.evaluate import EvalSet, UserRanks, rank_users
from p2prec.model.backbone import SeqRecModel
from p2prec.run.data import select_nodes
from p2prec.sim.faults import FaultPlan, RoundFaults
from p2prec.sim.plan import MixingPlan


@dataclass
class Packet:
    """States one shard sends another in one exchange: the senders' global ids (ascending),
    the norms of their shared adapters (:func:`p2prec.gossip.robust.state_norms`) and their
    stacked states."""

    rows: np.ndarray
    norms: np.ndarray
    states: Params


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``shards`` contiguous blocks of ``n`` nodes, as even as possible."""
    if not 1 <= shards <= n:
        raise ValueError(f"sim.shards: need 1 to {n} shards for {n} nodes, got {shards}")
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class Shard:
    """Nodes ``start .. stop - 1`` of the simulation ``cfg`` describes (flat gossip, linear mixing)."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph,
                 bounds: list[tuple[int, int]], index: int) -> None:
        self.cfg = cfg
        self.data = data
        self.index = index
        self.start, self.stop = bounds[index]
        self.rows = np.arange(self.start, self.stop)
        nodes = select_nodes(data, cfg)
        self.n = len(nodes)
        self.owner = np.repeat(np.arange(len(bounds)), [b - a for a, b in bounds])
        self.shards = len(bounds)
        self.model = adapter_model(backbone, cfg)
        self.nodes = [nodes[i] for i in self.rows]
        self.pop = configured_population(self.model, data, cfg, self.nodes, ids=self.rows, gossiped=True)
        counts = np.asarray([sum(len(data.train[u]) for u in users) for users in nodes], dtype=np.float64)
        self.plan = MixingPlan(graph, self.n, counts, cfg.gossip, cfg.run.seed)
        self.faults = FaultPlan(cfg.sim, self.n, cfg.run.seed)
        self.stack = GossipStack.from_config(cfg)
        self.norm_rule = self.stack.norm_rule()
        self._round: RoundFaults | None = None
        self._mixing: sp.csr_matrix | None = None
        self._messages = (0, 0)
        self._eval_set: EvalSet | None = None

    def train(self, rnd: int) -> tuple[float, int]:
        """Round ``rnd``'s faults and local update; the mean loss of the shard's active nodes and their count."""
        self._round = self.faults.round(rnd)
        active = ~self._round.down[self.rows]
        if not self.stack.trains(rnd) or not active.any():
            return float("nan"), 0
        return self.pop.train_round(rnd, active=active), int(active.sum())

    def outbox(self, rnd: int, exchange: int) -> list[Packet | None]:
        """Draw exchange ``exchange``'s mixing matrix and return, per shard, the packet of this
        shard's states that its rows mix (``None`` for this shard itself and for shards that
        need nothing from it). Exchanges must come in order: they share the round's fault draws."""
        mixing = self.plan.round(rnd, self._round, exchange)
        w = sp.csr_matrix(mixing.a + sp.diags(mixing.d))
        self._mixing = w
        self._messages = (mixing.messages, mixing.received)
        coo = w.tocoo()
        crossing = (self.owner[coo.col] == self.index) & (self.owner[coo.row] != self.index) & (coo.data != 0)
        shared = self.pop.shared()
        norms = state_norms(shared, bounded_names(list(shared))).numpy()
        out: list[Packet | None] = [None] * self.shards
        for dest in np.unique(self.owner[coo.row[crossing]]):
            senders = np.unique(coo.col[crossing & (self.owner[coo.row] == dest)])
            local = torch.from_numpy(senders - self.start)
            out[int(dest)] = Packet(senders, norms[senders - self.start], {k: v[local] for k, v in shared.items()})
        return out

    def mix(self, *packets: Packet | None) -> tuple[int, int]:
        """Replace this shard's shared states by their mixing with its own and the ``packets``' rows,
        as :meth:`p2prec.sim.engine.Simulation._mix_into` does on flat gossip; return the messages
        the whole network sent in this exchange and those that arrived (every shard draws the same)."""
        own = self.pop.shared()
        names = list(own)
        received = [p for p in packets if p is not None]
        cols = np.concatenate([self.rows, *(p.rows for p in received)])
        order = np.argsort(cols, kind="stable")
        cols = cols[order]
        sent_norms = np.zeros(self.n)
        own_norms = state_norms(own, bounded_names(names)).numpy()
        sent_norms[self.rows] = own_norms
        for p in received:
            sent_norms[p.rows] = p.norms
        w = self._mixing[self.start:self.stop]
        bounded = self.norm_rule.apply(w, sent_norms, own_norms, row_nodes=self.rows)
        w = sp.csr_matrix(bounded if bounded is not None else w)
        d = np.asarray(w[np.arange(len(self.rows)), self.rows]).ravel()
        a = sp.csr_matrix(w - sp.csr_matrix((d, (np.arange(len(self.rows)), self.rows)), shape=w.shape))
        a.eliminate_zeros()
        if np.setdiff1d(a.indices, cols).size:
            raise RuntimeError(f"shard {self.index}: a neighbour's state was not received")
        take = torch.from_numpy(order)
        stacked = {k: torch.cat([own[k], *(p.states[k] for p in received)])[take] for k in names}
        mix_into(sp.csr_matrix(a[:, cols]), stacked, own, d, names)
        return self._messages

    def bound_counts(self) -> tuple[int, int]:
        """Messages to this shard's rows the norm bound has dropped so far, and links it has cut."""
        return self.norm_rule.dropped, len(self.norm_rule.cut)

    def sums(self) -> dict[str, np.ndarray]:
        """Per shared-adapter tensor (trackers aside, as the consensus distance is taken), the sum of
        this shard's states in float64: its share of the network mean."""
        return {k: self.pop.params[k].double().sum(dim=0).numpy() for k in self.pop.shared_names}

    def spread(self, mean: dict[str, np.ndarray]) -> float:
        """Sum over this shard's nodes of the squared distance of their shared adapters from ``mean``."""
        return sum(float((self.pop.params[k] - torch.from_numpy(m).to(torch.float32)).pow(2).sum())
                   for k, m in mean.items())

    def ranks(self) -> UserRanks:
        """This shard's users' ranks under the configured protocols (:func:`p2prec.learn.evaluate.rank_users`)."""
        if self._eval_set is None:
            self._eval_set = federated_eval_set(self.data, self.cfg, self.nodes)
        return rank_users(self.model, self.pop.params, self._eval_set, tuple(self.cfg.eval.protocols), stacked=True,
                          k=self.cfg.eval.k)

    def params(self) -> Params:
        """The shard's stacked adapters, node ``start`` first."""
        return self.pop.params
