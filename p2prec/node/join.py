"""Joining a running network: ask the neighbours for their shared state, start from the most advanced.

Why: a node that joins late with a fresh shared adapter spends its first rounds relearning
what the network already knows, and drags its neighbours' mixing back meanwhile. So a
joining node (``p2prec-node --join``) first sends ``JOIN_REQUEST`` (no tensors) to every
neighbour. Each neighbour answers at the end of its current round with ``JOIN_STATE``: its
shared state after that round's mixing, through the network's codec, as a gossip message
would carry it, with ``round`` set to that round. The joiner takes the answer of the highest
round (the lowest sender id on ties), continues from the round after it, and keeps its own
personal adapter, gate and gradient trackers: a tracker copied from a neighbour would add to
the network's tracker sum a gradient no node holds, a bias that mixing never removes
(the simulator's ``sim.join`` does the same, :mod:`p2prec.sim.engine`).

Both messages pass the validator like every other (sender, codec, tensor names, shapes,
sizes, finite values) and come only from topology neighbours of a flat network. On top of
that: an answer nobody asked for, a second answer from one peer, and an answer claiming a
round beyond the run are rejected; a peer's requests are answered at most once a round, so
asking again and again costs the answering node nothing more. Join messages never enter
the round inbox: a request does not make the answering node wait for the joiner's gossip
while the joiner waits for the answer, and an answer marks its sender present, as a hello does.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from p2prec.gossip.codecs import Codec
from p2prec.gossip.mixing import TRACK
from p2prec.node.inbox import Inbox
from p2prec.node.learner import Learner
from p2prec.node.transport import Transport
from p2prec.wire import Message, MessageType, WireError, encode

log = logging.getLogger(__name__)

JOIN_TYPES = frozenset({MessageType.JOIN_REQUEST, MessageType.JOIN_STATE})


class JoinDesk:
    """Both sides of the join exchange for node ``node`` of a run of ``rounds`` rounds."""

    def __init__(self, node: int, rounds: int) -> None:
        self.node = node
        self.rounds = rounds
        self.requests: set[int] = set()
        self.answers: dict[int, Message] | None = None
        """Answers received while asking; None when this node is not asking."""
        self._heard = asyncio.Event()

    def take(self, msg: Message, inbox: Inbox) -> None:
        """File a validated join message; :class:`WireError` for an answer that breaks the rules above."""
        if msg.type is MessageType.JOIN_REQUEST:
            self.requests.add(msg.sender)
            return
        if self.answers is None:
            raise WireError(f"JOIN_STATE from node {msg.sender}, but this node asked nobody")
        if msg.round > self.rounds:
            raise WireError(f"JOIN_STATE claims round {msg.round}, beyond this run's {self.rounds} rounds")
        if msg.sender in self.answers:
            raise WireError(f"a second JOIN_STATE from node {msg.sender}")
        self.answers[msg.sender] = msg
        inbox.offer(Message(MessageType.HELLO, msg.sender, 0, msg.codec, {}, {}))
        self._heard.set()

    async def ask(self, transport: Transport, inbox: Inbox, peers: list[int], codec: Codec, own_round: int,
                  wait_s: float, settle_s: float) -> Message | None:
        """Ask every peer; wait until all answered, or ``wait_s`` passes, or ``settle_s`` after the
        first answer (the others finish the same round about then). Return the most advanced
        answer if it is ahead of ``own_round``, else None."""
        self.answers = {}
        request = encode(Message(MessageType.JOIN_REQUEST, self.node, own_round, codec.name, {}, {}))
        for peer in peers:
            await transport.send(peer, request)
        loop = asyncio.get_running_loop()
        deadline, settling = loop.time() + wait_s, False
        while len(self.answers) < len(peers) and (remaining := deadline - loop.time()) > 0:
            self._heard.clear()
            try:
                await asyncio.wait_for(self._heard.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
            inbox.check_open()
            if self.answers and not settling:
                deadline, settling = min(deadline, loop.time() + settle_s), True
        answers, self.answers = self.answers, None
        best = max(answers.values(), key=lambda m: (m.round, -m.sender), default=None)
        return best if best is not None and best.round > own_round else None

    async def answer(self, transport: Transport, learner: Learner, codec: Codec, round_: int) -> None:
        """Send this node's shared state after round ``round_`` to every peer that asked and is not answered yet.

        A peer whose send queue is full is answered after the next round instead: while it was
        away this node's gossip to it piled up, and the queue drains only once it is back.
        """
        if not self.requests:
            return
        payload = codec.encode(learner.shared())
        frames = encode(Message(MessageType.JOIN_STATE, self.node, round_, codec.name, payload, {}))
        for peer in sorted(self.requests):
            if await transport.send(peer, frames):
                self.requests.discard(peer)
                log.info("node %d: sent its round-%d shared state to joining node %d", self.node, round_, peer)


def adopt(learner: Learner, answer: Message) -> None:
    """Take the answer's shared adapter; keep this node's own trackers (see the module docstring)."""
    state = learner.shared()
    state.update({k: np.asarray(v) for k, v in answer.tensors.items() if not k.startswith(TRACK)})
    learner.set_shared(state)
