"""Event-driven asynchronous simulation: every node on its own simulated clock, no rounds.

Each node repeats: a local update lasting its ``compute`` time (:mod:`p2prec.sim.clock`), then
it sends its trained shared adapter to its neighbours (each copy arrives after its link's
latency), then it mixes the freshest state it holds from each neighbour by the rule of
:mod:`p2prec.gossip.async_rule`, the real async node's own (:mod:`p2prec.node.async_loop`).

Why batches are exact: the events are visited in time order (an arrival at the same instant
as an update counts as before it), but the math of the updates whose times fall within one
*lookahead* window, the shortest link latency, runs together: no message sent inside the
window can arrive inside it, so none of those updates reads another's result, and running
them in one vectorized step equals running them one by one. Who mixes which of a sender's
states is decided while visiting (a sender's update index, a *version*); the states
themselves are kept for each sender's last two versions, which is all a receiver can hold
(the clock caps latency at half the sender's update time), and every read checks that the
version it asks for is the one stored.

Node ``i``'s ``k``-th update draws the batches a real node draws for its update ``k``
(:meth:`p2prec.learn.population.Population.train_round` with ``node_rounds``). ``run.rounds``
is the simulated time to run; evaluations happen every ``eval.every`` units of it and
``metrics.jsonl`` records ``sim_time`` and the local ``updates`` completed by then.
:meth:`AsyncSimulation.replay` runs a given schedule instead (what real nodes logged), which
is how the tests prove that the simulator and real nodes compute the same thing.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.gossip.async_rule import Freshest, mixing_row
from p2prec.gossip.mixing import consensus_distance, mix
from p2prec.learn.factories import selection_score
from p2prec.model.backbone import SeqRecModel
from p2prec.run.folder import make_record, traffic
from p2prec.sim.clock import NodeClock
from p2prec.sim.engine import Simulation
from p2prec.sim.timed import TimedSimulation
from p2prec.topology import metropolis_hastings

ARRIVE, UPDATE = 0, 1
"""Event kinds, in the order two events at the same instant are visited."""


@dataclass(frozen=True)
class Update:
    """Node ``node``'s ``k``-th local update, mixing version ``mixed[j]`` of each neighbour ``j``."""

    node: int
    k: int
    mixed: Mapping[int, int]


class Versions:
    """The shared states each node sent, ``keep`` versions per node, stacked ``[keep, N, ...]``."""

    def __init__(self, like: Mapping[str, torch.Tensor], keep: int) -> None:
        self.keep = keep
        self.states = {k: torch.zeros(keep, *v.shape, dtype=v.dtype) for k, v in like.items()}
        self.stored = np.full((keep, next(iter(like.values())).shape[0]), -1, dtype=np.int64)

    def put(self, nodes: np.ndarray, versions: np.ndarray, states: Mapping[str, torch.Tensor]) -> None:
        """Store ``states[k][nodes]`` as those nodes' versions ``versions``."""
        slots = torch.from_numpy(versions % self.keep)
        rows = torch.from_numpy(nodes)
        for k, v in self.states.items():
            v[slots, rows] = states[k][rows]
        self.stored[versions % self.keep, nodes] = versions

    def gather(self, entries: list[tuple[int, int, int, float]], rows: int) -> dict[str, torch.Tensor]:
        """``out[r] = sum of weight * version u of sender j`` over the entries ``(r, j, u, weight)``,
        ``rows`` rows (zeros where no entry names a row); a version no longer stored is an error."""
        n = self.stored.shape[1]
        out = {k: torch.zeros(rows, *v.shape[2:], dtype=v.dtype) for k, v in self.states.items()}
        for slot in range(self.keep):
            mine = [e for e in entries if e[2] % self.keep == slot]
            if not mine:
                continue
            r, j, u, w = (np.asarray(x) for x in zip(*mine))
            if (self.stored[slot, j] != u).any():
                raise RuntimeError("asynchronous simulation: a mixed version is no longer stored")
            matrix = sp.csr_matrix((w.astype(np.float64), (r, j)), shape=(rows, n))
            for k, v in mix(matrix, {k: v[slot] for k, v in self.states.items()}).items():
                out[k].add_(v)
        return out


class AsyncSimulation(Simulation):
    """N nodes gossiping asynchronously on simulated time (see the module docstring).

    It reuses the sync simulator's population, evaluation and message sizes; what the async
    rule does not cover (faults, attacks, joins, an edge hierarchy) is refused, not ignored.
    """

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph, keep: int = 2) -> None:
        super().__init__(cfg, data, backbone, graph)
        s = cfg.sim
        unsupported = {"sim.drop_prob": s.drop_prob, "sim.churn": s.churn, "sim.down": s.down,
                       "sim.stragglers": s.stragglers, "sim.attack": s.attack != "none", "sim.join": s.join,
                       "sim.deadline": s.deadline, "run.train_rounds": self.cfg.run.train_rounds}
        for key, value in unsupported.items():
            if value:
                raise ValueError(f"{key}: gossip.mode = 'async' does not simulate it yet")
        if self.plan.kind != "flat":
            raise ValueError("gossip.mode = 'async' needs a flat topology")
        n = len(self.nodes)
        self.clock = NodeClock(s, graph, n, self.cfg.run.seed)
        self.w = metropolis_hastings(graph)
        self.freshest: list[Freshest[None]] = [Freshest(cfg.gossip.max_staleness) for _ in range(n)]
        self.versions = Versions(self.pop.shared(), keep)
        self.degree = np.diff(self.w.indptr) - 1
        self.now = 0.0
        self.updates = 0
        self.batches = 0
        self._heap: list[tuple[float, int, int, tuple[int, ...]]] = []
        self._seq = 0
        by_sender = sp.csr_matrix(self.clock.latency.T)
        self._links = [(by_sender.indices[a:b].tolist(), by_sender.data[a:b].tolist())
                       for a, b in zip(by_sender.indptr[:-1], by_sender.indptr[1:])]
        for i in range(n):
            self._push(float(self.clock.compute[i]), UPDATE, (i,))

    def _push(self, at: float, kind: int, payload: tuple[int, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, kind, self._seq, payload))

    def _collect(self, until: float) -> list[Update]:
        """Visit events up to ``until`` and return the first lookahead window's updates (module docstring)."""
        batch: list[Update] = []
        start = None
        window = self.clock.lookahead()
        while self._heap and self._heap[0][0] <= until:
            at, kind, _, payload = self._heap[0]
            if kind == ARRIVE:
                heapq.heappop(self._heap)
                receiver, sender, version = payload
                self.freshest[receiver].arrive(sender, version, None)
                continue
            if start is not None and at >= start + window:
                break
            heapq.heappop(self._heap)
            start = at if start is None else start
            (i,) = payload
            fresh = self.freshest[i]
            batch.append(Update(i, fresh.updates + 1, {j: h.update for j, h in fresh.fresh().items()}))
            fresh.advance()
            self.now = at
            self._push(at + float(self.clock.compute[i]), UPDATE, (i,))
            receivers, delays = self._links[i]
            for receiver, delay in zip(receivers, delays):
                self._push(at + delay, ARRIVE, (receiver, i, fresh.updates))
        return batch

    def execute(self, batch: list[Update]) -> float:
        """Run ``batch``'s updates, whose mixes read only versions stored before it; their mean loss."""
        n = len(self.nodes)
        ids = np.asarray([u.node for u in batch], dtype=np.int64)
        ks = np.zeros(n, dtype=np.int64)
        ks[ids] = [u.k for u in batch]
        active = np.zeros(n, dtype=bool)
        active[ids] = True
        self.batches += 1
        loss = self.pop.train_round(self.batches, active, node_rounds=ks)
        own = self.pop.shared()
        self.versions.put(ids, ks[ids], own)
        entries: list[tuple[int, int, int, float]] = []
        d = np.zeros(len(batch))
        for r, u in enumerate(batch):
            row = mixing_row(self.w, u.node, list(u.mixed))
            weights = dict(zip(row.indices.tolist(), row.data.tolist()))
            d[r] = weights[u.node]
            entries += [(r, j, v, weights[j]) for j, v in u.mixed.items()]
        received = self.versions.gather(entries, len(batch))
        rows = torch.from_numpy(ids)
        scale = torch.from_numpy(d).to(torch.float32)
        for k, v in own.items():
            v[rows] = v[rows] * scale.view(-1, *([1] * (v.dim() - 1))) + received[k]
        self.updates += len(batch)
        sent = int(self.degree[ids].sum()) * self.msg_bytes
        self.bytes_sent_total += sent
        self.bytes_received_total += sent  # no faults in async mode: every message arrives
        return loss

    def replay(self, schedule: Iterable[Update]) -> None:
        """Run a given schedule (e.g. what real nodes logged), in any order that respects it: an
        update runs after its node's previous one and after every version it mixes. Updates go in
        one batch while none reads another's result. Needs ``keep`` above the versions alive."""
        waiting = {(u.node, u.k): u for u in schedule}
        ran: set[tuple[int, int]] = set()
        while waiting:
            ready = [u for u in waiting.values()
                     if (u.k == 1 or (u.node, u.k - 1) in ran) and all((j, v) in ran for j, v in u.mixed.items())]
            if not ready:
                raise ValueError(f"schedule: {len(waiting)} updates wait on updates it does not contain")
            ready.sort(key=lambda u: (u.k, u.node))
            self.execute(ready)
            for u in ready:
                ran.add((u.node, u.k))
                del waiting[(u.node, u.k)]

    def run(self, rounds: int | None = None, progress: bool = True, label: str = "sim",
            on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Simulate ``rounds`` (default ``run.rounds``) units of time, evaluating every ``eval.every``."""
        horizon = float(rounds or self.cfg.run.rounds)
        every = self.cfg.eval.every
        start = time.perf_counter()
        records: list[dict] = []
        best = float("-inf")
        bar = tqdm(total=int(horizon), desc=label, unit="time", disable=not progress, dynamic_ncols=True)
        for at in [*np.arange(every, horizon, every), horizon]:
            losses = []
            while True:
                batch = self._collect(float(at))
                if not batch:
                    break
                losses.append(self.execute(batch))
            consensus = consensus_distance(self._honest(self.pop.shared()), self.pop.shared_names)
            self.consensus.append(consensus)
            result = self.evaluate()
            loss = float(np.nanmean(losses)) if losses else None
            records.append(make_record(int(round(at)), result, loss, consensus, self.bytes_sent_total,
                                       time.perf_counter() - start, sim_time=float(at), updates=self.updates,
                                       **traffic(self.bytes_sent_total, self.bytes_received_total, len(self.nodes),
                                                 max(int(round(at)), 1))))
            best = max(best, selection_score(result, self.cfg))
            if on_record is not None:
                on_record(records)
            if not np.isfinite(consensus):
                self.diverged_at = int(round(at))
                break
            bar.update(int(round(at)) - bar.n)
            bar.set_postfix(updates=self.updates, val=f"{best:.4f}")
        bar.close()
        return records


def build_simulation(cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> Simulation:
    """The simulation ``cfg`` asks for: asynchronous, sync on the simulated clock (``sim.slow`` or
    ``sim.deadline`` set), or the plain sync engine."""
    if cfg.gossip.mode == "async":
        if graph is None:
            raise ValueError("gossip.mode = 'async' needs a topology (not the local-only baseline)")
        return AsyncSimulation(cfg, data, backbone, graph)
    if graph is not None and (cfg.sim.slow or cfg.sim.deadline):
        return TimedSimulation(cfg, data, backbone, graph)
    return Simulation(cfg, data, backbone, graph)
