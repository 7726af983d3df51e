"""One synchronous round of docs/design.md section 2, for each role, over real sockets.

A round is the local update, then ``gossip.exchanges`` exchanges of the node's role, each
sending what the previous one produced (the simulator's loop in
:meth:`p2prec.sim.engine.Simulation.step`). Per exchange:

- flat: send the shared adapter to this exchange's partners (every neighbour, or the
  exchange's drawn matching), collect theirs until the deadline, mix with the exchange's
  weights renormalised over who answered;
- client of an edge aggregator: send the shared adapter up with its sample count, take the
  aggregator's result when it comes back (keep its own if it does not);
- aggregator (training or aggregator-only): average what its members sent (and its own
  state, if it has data) weighted by sample count, gossip that average with neighbouring
  aggregators, mix, send the result down to the members.

The weights come from :mod:`p2prec.gossip.aggregate`, which derives each node's row with
the simulator's own functions; that is why real nodes reproduce the simulator's numbers.
Every message goes out through the network's codec; a flat node's own term in mixing is
its true, uncompressed state, as in the simulator, while its neighbours' terms are what
they decoded from its message. With a robust rule a flat node aggregates the same terms
through :func:`p2prec.gossip.aggregate.robust_combine`, its row of the simulator's rule.
With privacy, every node with data releases its update right after training, before
anything leaves it. The codec, the robust rule, the norm bound, privacy and the schedule
are the simulator's own: both build them with :class:`p2prec.gossip.stack.GossipStack`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from p2prec.gossip.aggregate import combine, count_weighted_row, heard_row, robust_combine
from p2prec.gossip.codecs import ErrorFeedback
from p2prec.gossip.robust import bounded_names, link_keys, state_norms
from p2prec.gossip.stack import GossipStack
from p2prec.node.inbox import Inbox
from p2prec.node.learner import Learner
from p2prec.node.place import FLAT, Place
from p2prec.node.transport import Transport
from p2prec.topology.roles import CLIENT
from p2prec.wire import Message, MessageType, encode
from p2prec.wire.message import exchange_meta

CLIENT_EXCHANGES = 3
"""A client's answer needs three exchanges (up, across, down), so it waits three deadlines."""


@dataclass
class Exchanged:
    """What one exchange did: messages heard, messages expected, bytes sent and received
    (the frames of the messages it collected, as the simulator counts those that arrive)."""

    heard: int
    expected: int
    bytes_sent: int
    bytes_received: int = 0


@dataclass
class RoundResult:
    """What a round did, for the per-round log line and ``rounds.jsonl``."""

    loss: float
    heard: int
    expected: int
    local_s: float
    bytes_sent: int
    bytes_received: int = 0


class Protocol:
    """Runs rounds for the node at ``place``; ``learner`` is ``None`` for an aggregator-only node.

    ``stack`` is the network's gossip stack, the simulator's own
    (:class:`p2prec.gossip.stack.GossipStack`): its codec encodes every message, its robust
    rule (``None`` for plain mixing) aggregates a flat node's exchange, its norm bound drops
    received states before mixing (each reported to ``on_reject`` as peer, reason, detail;
    they still count as heard), its privacy (a stack of one) releases the update, and it
    says how many exchanges a round has and which rounds train. ``feedback``, the sender's
    error-feedback residual (``None`` unless the codec keeps one), carries over from one
    gossip message to the next.
    """

    def __init__(self, place: Place, learner: Learner | None, inbox: Inbox, transport: Transport,
                 deadline_s: float, first_round: int, start_timeout_s: float, stack: GossipStack,
                 feedback: ErrorFeedback | None = None,
                 on_reject: Callable[[int, str, str], None] | None = None) -> None:
        self.place = place
        self.on_reject = on_reject or (lambda peer, reason, detail: None)
        self.stack = stack
        self.norm_rule = stack.norm_rule()
        self.feedback = feedback
        self.learner = learner
        self.inbox = inbox
        self.transport = transport
        self.deadline_s = deadline_s
        self.first_round = first_round
        self.start_timeout_s = start_timeout_s

    async def run(self, round_: int) -> RoundResult:
        """One complete round; raises :class:`p2prec.node.inbox.Abandoned` if told to stop meanwhile."""
        loss, local_s = await self._train(round_)
        step = {FLAT: self._flat, CLIENT: self._client}.get(self.place.kind, self._aggregator)
        done = [await step(round_, exchange) for exchange in range(self.stack.exchanges)]
        return RoundResult(loss, sum(d.heard for d in done), sum(d.expected for d in done), local_s,
                           sum(d.bytes_sent for d in done), sum(d.bytes_received for d in done))

    async def _train(self, round_: int) -> tuple[float, float]:
        """The local update, off the event loop so messages keep arriving; (loss, seconds).

        A round past ``run.train_rounds`` has none (NaN loss). With privacy the update is then
        released against the state the round started from (:meth:`GossipStack.start_round`),
        the last round's mixed state, also after a restart, since the checkpoint is written
        after mixing, and after a join, whose adopted state is where the round starts.
        """
        if self.learner is None:
            return math.nan, 0.0
        start = time.perf_counter()
        self.stack.start_round(self.learner.pop.shared())
        loss = await asyncio.to_thread(self.learner.train, round_) if self.stack.trains(round_) else math.nan
        self.inbox.check_open()
        self.stack.release(self.learner.pop.shared(), round_, np.ones(1, dtype=bool))
        return loss, time.perf_counter() - start

    async def _send(self, peers: Iterable[int], kind: MessageType, round_: int, exchange: int,
                    tensors: Mapping[str, np.ndarray], feedback: ErrorFeedback | None = None, **meta: int) -> int:
        """Encode ``tensors`` once, through the codec (and ``feedback``), and queue it for every peer."""
        codec = self.stack.codec
        payload = codec.encode(tensors, feedback)
        frames = encode(Message(kind, self.place.node, round_, codec.name, payload,
                                {**meta, **exchange_meta(exchange)}))
        return sum([await self.transport.send(peer, frames) for peer in peers])

    def _deadline(self, round_: int, exchanges: int = 1) -> float:
        """When the wait for this exchange ends. A process's first round may also wait out
        its neighbours' start-up, because they may still be waiting for a peer that never comes."""
        extra = self.start_timeout_s if round_ == self.first_round else 0.0
        return asyncio.get_running_loop().time() + exchanges * self.deadline_s + extra

    async def _flat(self, round_: int, exchange: int) -> Exchanged:
        own = self.learner.shared()
        me = self.place.node
        w = self.place.rounds.round(round_, exchange)
        partners = [int(j) for j in w[me].indices if j != me]
        sent = await self._send(partners, MessageType.GOSSIP, round_, exchange, own, self.feedback)
        got = await self.inbox.collect(round_, MessageType.GOSSIP, partners, self._deadline(round_), exchange)
        row, heard, size = heard_row(w, me, got), len(got), _wire_bytes(got)
        if got:
            row, got = self._bounded(row, own, got, round_, exchange)
        received = {j: m.tensors for j, m in got.items()}
        if self.stack.aggregation is None:
            self.learner.set_shared(combine(row, {me: own, **received}))
        else:
            self.learner.set_shared(robust_combine(self.stack.aggregation, row, me, own, received))
        return Exchanged(heard, len(partners), sent, size)

    def _bounded(self, row: sp.csr_matrix, own: Mapping[str, np.ndarray], got: dict[int, Message], round_: int,
                 exchange: int) -> tuple[sp.csr_matrix, dict[int, Message]]:
        """Drop the received states beyond ``robust.norm_bound`` or over a link cut before (the
        simulator's own :class:`p2prec.gossip.robust.NormBound`, on this node's row); report each
        to ``on_reject``."""
        me = self.place.node
        measured = bounded_names(list(own))
        sent = np.zeros(self.place.n_nodes)
        for j, m in got.items():
            sent[j] = float(state_norms({k: torch.as_tensor(np.asarray(m.tensors[k]))[None] for k in measured}))
        mine = float(state_norms({k: torch.as_tensor(np.asarray(own[k]))[None] for k in measured}))
        cut = set(self.norm_rule.cut.tolist())
        bounded = self.norm_rule.apply(row, sent, np.array([mine]), row_nodes=[me])
        if bounded is None:
            return row, got
        kept = {int(j) for j in bounded.indices}
        for j in sorted(set(got) - kept):
            if link_keys(np.array([me]), np.array([j]), self.place.n_nodes)[0] in cut:
                self.on_reject(j, "link cut by the norm bound", f"round {round_}, exchange {exchange}")
                continue
            self.on_reject(j, "state beyond the norm bound",
                           f"round {round_}, exchange {exchange}: norm {sent[j]:.4g} against own {mine:.4g}, "
                           f"bound {self.stack.norm_bound:g} x the neighbourhood's median")
        return bounded, {j: m for j, m in got.items() if j in kept}

    async def _client(self, round_: int, exchange: int) -> Exchanged:
        hub = self.place.aggregator
        sent = await self._send([hub], MessageType.AGGREGATE_UP, round_, exchange, self.learner.shared(),
                                samples=self.learner.samples)
        got = await self.inbox.collect(round_, MessageType.AGGREGATE_DOWN, [hub],
                                       self._deadline(round_, CLIENT_EXCHANGES), exchange)
        if hub in got:
            self.learner.set_shared(got[hub].tensors)
        return Exchanged(len(got), 1, sent, _wire_bytes(got))

    async def _aggregator(self, round_: int, exchange: int) -> Exchanged:
        place, me = self.place, self.place.node
        ups = await self.inbox.collect(round_, MessageType.AGGREGATE_UP, place.members, self._deadline(round_),
                                       exchange)
        states: dict[int, Mapping[str, np.ndarray]] = {j: m.tensors for j, m in ups.items()}
        counts = {j: float(m.meta["samples"]) for j, m in ups.items()}
        if self.learner is not None:
            states[me] = self.learner.shared()
            counts[me] = float(self.learner.samples)
        expected = len(place.members) + len(place.agg_peers)
        if not states:
            # Nothing to average: stay silent, as the simulator does; neighbours renormalise
            # without it and its clients keep their own adapters.
            return Exchanged(0, expected, 0, _wire_bytes(ups))
        ids = sorted(states)
        up = combine(count_weighted_row(ids, [counts[j] for j in ids], place.n_nodes), states)
        up_arrays = {k: v.numpy() for k, v in up.items()}
        sent = await self._send(place.agg_peers, MessageType.GOSSIP, round_, exchange, up_arrays)
        across = await self.inbox.collect(round_, MessageType.GOSSIP, place.agg_peers, self._deadline(round_),
                                          exchange)
        index = place.mixing_ids.index
        row = heard_row(place.mixing, place.mixing_row, [index(b) for b in across])
        mixed = combine(row, {place.mixing_row: up_arrays, **{index(b): m.tensors for b, m in across.items()}})
        mixed_arrays = {k: v.numpy() for k, v in mixed.items()}
        sent += await self._send(place.members, MessageType.AGGREGATE_DOWN, round_, exchange, mixed_arrays)
        if self.learner is not None:
            self.learner.set_shared(mixed_arrays)
        return Exchanged(len(ups) + len(across), expected, sent, _wire_bytes(ups) + _wire_bytes(across))


def _wire_bytes(got: Mapping[int, Message]) -> int:
    """Bytes received in ``got``'s messages, counted from the frames they arrived in."""
    return sum(m.wire_bytes for m in got.values())

