"""The simulator with its population split into shards (:mod:`p2prec.sim.shard`), wherever they run.

Why a subclass of :class:`p2prec.sim.engine.Simulation`: the rounds, evaluations, records
and summaries stay the simulator's own (:meth:`Simulation.run`); only what a round does to
the nodes goes through a :class:`ShardPool`, which runs every shard's step where the
shards live: in this process (:class:`LocalPool`) or in Ray actors
(:class:`p2prec.sim.ray_backend.RayPool`). The driver holds no node state, so its memory
does not grow with the population.

What the sharded path supports: flat gossip with the mean rule (and the norm bound),
gradient tracking, several exchanges, message loss, churn, outages and lost stragglers.
Codecs, privacy, attacks, robust rules, late joiners, late stragglers and edge
hierarchies are refused by :func:`check_sharded`, with one line naming the key.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any

import networkx as nx
import torch

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import Params
from p2prec.gossip.robust import aggregation_from_config
from p2prec.gossip.stack import GossipStack
from p2prec.learn.factories import adapter_model
from p2prec.learn.evaluate import concat_ranks, summarize_ranks
from p2prec.learn.population import gossip_template
from p2prec.model.backbone import SeqRecModel
from p2prec.run.data import select_nodes
from p2prec.sim.engine import RoundStats, Simulation, message_bytes
from p2prec.sim.plan import JoinPlan
from p2prec.sim.shard import Shard, shard_bounds
from p2prec.topology import aggregators


def check_sharded(cfg: Config, graph: nx.Graph | None) -> None:
    """Refuse, in one line, a config the sharded simulator does not run (see the module docstring)."""
    backend = cfg.sim.backend
    refused = [
        (graph is None or bool(aggregators(graph)), "gossip.topology: flat gossip only (no edge hierarchy, "
                                                     "no baseline)"),
        (aggregation_from_config(cfg.robust) is not None, "robust.rule and robust.tracker_rule: 'mean' only"),
        (cfg.gossip.codec != "none", "gossip.codec: 'none' only"),
        (cfg.gossip.mode != "sync", "gossip.mode: 'sync' only"),
        (bool(cfg.sim.slow or cfg.sim.deadline), "sim.slow and sim.deadline: the simulated clock runs locally only"),
        (cfg.privacy.enabled, "privacy.enabled: not supported"),
        (cfg.sim.attack != "none", "sim.attack: not supported"),
        (bool(cfg.sim.join), "sim.join: not supported"),
        (cfg.sim.stragglers > 0 and cfg.sim.straggler_mode == "late", "sim.straggler_mode: 'lost' only"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"sim.backend = {backend!r} runs a subset of the simulator: {why}; "
                             "use sim.backend = 'local'")


class ShardPool(ABC):
    """Where the shards live. Every method acts on all shards, in shard order."""

    def __init__(self, shards: int) -> None:
        self.shards = shards

    @abstractmethod
    def map(self, method: str, *args: Any) -> list[Any]:
        """``Shard.method(*args)`` on every shard; the results in shard order."""

    @abstractmethod
    def exchange(self, rnd: int, exchange: int) -> tuple[int, int]:
        """One gossip exchange: every shard's :meth:`Shard.outbox`, each packet delivered to its
        shard's :meth:`Shard.mix`; the messages the network sent, and those that arrived."""

    def close(self) -> None:
        """Release what the pool holds (nothing in-process)."""


class LocalPool(ShardPool):
    """The shards as objects of this process: what Ray runs, without Ray (one core, for checks)."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph, shards: int) -> None:
        super().__init__(shards)
        bounds = shard_bounds(len(select_nodes(data, cfg)), shards)
        # Each shard wraps its own copy in adapters, as each Ray actor unpickles its own.
        self.members = [Shard(cfg, data, copy.deepcopy(backbone), graph, bounds, i) for i in range(shards)]

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.members]

    def exchange(self, rnd: int, exchange: int) -> tuple[int, int]:
        out = [s.outbox(rnd, exchange) for s in self.members]
        return [s.mix(*(out[u][t] for u in range(self.shards) if u != t)) for t, s in enumerate(self.members)][0]


class ShardedSimulation(Simulation):
    """:class:`Simulation` whose nodes live in the shards of ``pool`` (all nodes honest, all present)."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph, pool: ShardPool) -> None:
        check_sharded(cfg, graph)
        self.cfg = cfg
        self.data = data
        self.pool = pool
        self.nodes = select_nodes(data, cfg)
        n = len(self.nodes)
        self.model = adapter_model(copy.deepcopy(backbone), cfg)  # message sizes only: the shards hold their own
        self.graph = graph
        self.byzantine = torch.zeros(n, dtype=torch.bool)
        self.honest = torch.arange(n)
        self.joins = JoinPlan(cfg.sim, n, cfg.run.seed)
        self.join_log: list[dict[str, Any]] = []
        self.join_sources: dict[int, dict[int, int]] = {}
        self.stack = GossipStack.from_config(cfg)
        template = gossip_template(self.model, cfg.gossip.tracking)
        self.msg_bytes = message_bytes(template, self.stack.codec)
        self.later_msg_bytes = message_bytes(template, self.stack.codec, exchange=1)
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.diverged_at: int | None = None
        self.consensus: list[float] = []

    def step(self, rnd: int, vectorized: bool = True) -> RoundStats:
        """One round on every shard: faults and local updates, then ``gossip.exchanges`` exchanges."""
        if not vectorized:
            raise ValueError("the sharded simulator trains vectorized only")
        trained = self.pool.map("train", rnd)
        active = sum(count for _, count in trained)
        loss = sum(value * count for value, count in trained if count) / active if active else float("nan")
        messages = sent_bytes = received_bytes = 0
        for exchange in range(self.stack.exchanges):
            sent, received = self.pool.exchange(rnd, exchange)
            size = self.later_msg_bytes if exchange else self.msg_bytes
            messages += sent
            sent_bytes += sent * size
            received_bytes += received * size
        self.bytes_sent_total += sent_bytes
        self.bytes_received_total += received_bytes
        self.consensus.append(self._consensus())
        return RoundStats(loss, self.consensus[-1], messages, sent_bytes, received_bytes)

    def bound_counts(self) -> tuple[int, int]:
        """The shards' norm-bound counts summed (each shard bounds its own rows)."""
        counts = self.pool.map("bound_counts")
        return sum(d for d, _ in counts), sum(c for _, c in counts)

    def _consensus(self) -> float:
        """:func:`p2prec.gossip.mixing.consensus_distance` over every shard: the mean from the
        shards' sums, then their squared distances from it (two passes, as in one process)."""
        sums = self.pool.map("sums")
        n = len(self.nodes)
        mean = {k: sum(s[k] for s in sums) / n for k in sums[0]}
        return math.sqrt(sum(self.pool.map("spread", mean)) / n)

    def evaluate(self) -> dict:
        """The shards' ranks, concatenated in node order and summarized as one evaluation."""
        protocols = tuple(self.cfg.eval.protocols)
        return summarize_ranks(concat_ranks(self.pool.map("ranks")), protocols, self.cfg.eval.k)

    def params(self) -> Params:
        """Every node's adapters, gathered from the shards in node order."""
        parts = self.pool.map("params")
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Release the shards (a local Ray instance stops with them)."""
        self.pool.close()

