"""A real node in asynchronous mode: train, send, mix the freshest neighbour states, repeat; no barrier.

Why a loop of its own beside the round protocol: nothing here waits for anyone. A slow
neighbour does not hold a fast node back (the fast node mixes the slow one's last state
until it is ``gossip.max_staleness`` of its own updates old, then leaves it out), and a
restarted node starts its next update at once from its checkpoint, with nothing held, and
mixes its neighbours' states as they arrive. The rule is :mod:`p2prec.gossip.async_rule`,
the event-driven simulator's own (:mod:`p2prec.sim.events`).

Everything else is the sync node's (:class:`p2prec.node.runtime.Node`): the same sockets
and CurveZMQ, the same validation of every message (a hostile one is counted and dropped
before it reaches :class:`AsyncInbox`), and the same commit point: after each update its
metrics, then the atomic checkpoint, then its ``rounds.jsonl`` line, which here also names
the neighbour versions mixed (``mixed``: sender -> the sender's update index). A ``kill -9``
therefore loses at most the update in progress. ``node.slowdown`` idles after each update,
(slowdown - 1) times as long as the whole update took, checkpoint included.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from p2prec.config import Config, ConfigError
from p2prec.gossip.aggregate import combine
from p2prec.gossip.async_rule import Freshest, mixing_row
from p2prec.gossip.stack import GossipStack
from p2prec.node.inbox import Abandoned
from p2prec.node.learner import Learner
from p2prec.node.place import FLAT, Place
from p2prec.node.protocol import RoundResult
from p2prec.node.transport import Transport
from p2prec.wire import Message, MessageType, encode


class Counted(Protocol):
    round: int


class Updates(Protocol):
    """What the loop needs of the node running it (:class:`p2prec.node.runtime.Node`, which
    imports this module): its parts, its update count and its commit point."""

    cfg: Config
    place: Place
    learner: Learner | None
    stack: GossipStack

    progress: Counted

    def _finish_round(self, round_: int, result: RoundResult, started: float, extra: dict | None = None) -> None: ...


class AsyncInbox:
    """The freshest state from each neighbour (:class:`Freshest` of messages), with the parts of
    :class:`p2prec.node.inbox.Inbox` the node's receiver and shutdown use."""

    def __init__(self, max_staleness: int, updates: int) -> None:
        self.freshest: Freshest[Message] = Freshest(max_staleness, updates)
        self.refusal = ""
        self.finished: dict[int, int] = {}
        self.bytes_received = 0
        self._closed = asyncio.Event()

    def offer(self, msg: Message) -> bool:
        """Hold a validated gossip message as its sender's freshest; hellos and byes hold nothing.

        Every gossip message held is counted in :attr:`bytes_received`, a newer one from the same
        sender included: it crossed the link whether or not an update mixed it.
        """
        self.refusal = ""
        if msg.type is MessageType.BYE:
            self.finished[msg.sender] = msg.round
            return False
        if msg.type is not MessageType.GOSSIP:
            return False
        self.freshest.arrive(msg.sender, msg.round, msg)
        self.bytes_received += msg.wire_bytes
        return True

    def take_received(self) -> int:
        """Bytes of the gossip messages held since the last call (an update's share of the traffic)."""
        taken, self.bytes_received = self.bytes_received, 0
        return taken

    def close(self) -> None:
        self._closed.set()

    def check_open(self) -> None:
        if self._closed.is_set():
            raise Abandoned

    async def idle(self, seconds: float) -> None:
        """Sleep ``seconds``, or raise :class:`Abandoned` as soon as the node is told to stop."""
        try:
            await asyncio.wait_for(self._closed.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise Abandoned


async def run_async(node: Updates, inbox: AsyncInbox, transport: Transport) -> None:
    """Run ``node``'s remaining local updates up to ``run.rounds`` (see the module docstring)."""
    learner, place = node.learner, node.place
    if learner is None or place.kind != FLAT:
        raise ConfigError("gossip.mode = 'async' needs a flat topology of data nodes")
    me, peers = place.node, sorted(place.peers)
    w = place.rounds.base
    codec = node.stack.codec
    hello = encode(Message(MessageType.HELLO, me, node.progress.round + 1, codec.name, {}, {}))
    for peer in peers:
        await transport.send(peer, hello)
    while node.progress.round < node.cfg.run.rounds:
        k = node.progress.round + 1
        started = time.perf_counter()
        loss = await asyncio.to_thread(learner.train, k)
        inbox.check_open()
        local_s = time.perf_counter() - started
        own = learner.shared()
        frames = encode(Message(MessageType.GOSSIP, me, k, codec.name, codec.encode(own), {}))
        sent = sum([await transport.send(peer, frames) for peer in peers])
        fresh = inbox.freshest.fresh()
        row = mixing_row(w, me, list(fresh))
        learner.set_shared(combine(row, {me: own, **{j: h.item.tensors for j, h in fresh.items()}}))
        inbox.freshest.advance()
        node._finish_round(k, RoundResult(loss, len(fresh), len(peers), local_s, sent, inbox.take_received()), started,
                           {"mixed": {str(j): h.update for j, h in sorted(fresh.items())}, "time": time.time()})
        if node.cfg.node.slowdown > 1:
            await inbox.idle((node.cfg.node.slowdown - 1) * (time.perf_counter() - started))
