"""Validated messages sorted by round, and the wait for a round's messages with a deadline.

Why a separate inbox: messages arrive whenever peers send them, while the round protocol
asks for "round t's messages of this type from these peers, until the deadline". The
inbox bridges the two and enforces the protocol's rules: a message for a past round is
dropped, one for a future round is held only up to ``future_rounds`` ahead, and at most
one message per (round, exchange, type, sender) is held, so a peer cannot make a node hold
more than ``future_rounds + 1`` rounds of its messages (the node has checked the exchange
index against ``gossip.exchanges`` before offering the message).

A message dropped for any of these reasons changes no state at all, not even the
bookkeeping below: otherwise one forged far-future round would silence its claimed sender.

A round's wait skips two kinds of peer. One already heard at a *later* round or exchange
(within the window):
each peer's messages arrive in order over one connection, so its message for this one came
or never will; this lets a node that restarted behind its neighbours catch up without waiting out a
deadline per round. And one that is *absent*: it missed a deadline (or the start-up wait)
and nothing from it has arrived since. Why: with synchronous rounds, a node that waits out
a full deadline every round for a dead neighbour delays its own messages by that much, so
its other neighbours miss their deadlines too, and the stall spreads. A dead neighbour
therefore costs one deadline, and a peer is waited for again as soon as anything from it
arrives in the window. A restarted node says hello first, naming the round it resumes at:
if that is behind this node's round it is not waited for until it catches up (its
messages meanwhile are for past rounds), so its restart costs no second deadline. A node
that finishes the run says bye, and is not waited for again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from p2prec.wire import Message, MessageType
from p2prec.wire.message import exchange_of

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """The node was told to stop while waiting; the current round will not complete."""


class Inbox:
    """Holds messages for rounds ``current .. current + future_rounds``; see the module docstring."""

    def __init__(self, node: int, future_rounds: int, first_round: int = 1) -> None:
        self.node = node
        self.future_rounds = future_rounds
        self.current = first_round
        self._held: dict[tuple[int, int, MessageType], dict[int, Message]] = {}
        self._latest: dict[int, tuple[int, int]] = {}
        self._present: set[int] = set()
        self._absent: set[int] = set()
        self._changed = asyncio.Event()
        self._closed = False
        self.refusal = ""
        self.finished: dict[int, int] = {}

    def offer(self, msg: Message) -> bool:
        """File a validated message; return whether it is held for a round.

        A hello marks its sender present. A round-bearing message changes state only when it
        is inside the window (``current .. current + future_rounds``) and not a duplicate: then
        it marks its sender present and records the latest (round, exchange) the sender has
        reached. Why nothing else: a message outside the window is one no honest peer sends
        while both run, so one claim of a far-future round must not make the node stop waiting
        for its claimed sender. Returns ``False`` with the reason in ``self.refusal`` otherwise.
        """
        self.refusal = ""
        if msg.type is MessageType.BYE:
            self._present.add(msg.sender)
            self._absent.add(msg.sender)
            self.finished[msg.sender] = msg.round
            self._changed.set()
            log.info("node %d: node %d has finished the run (after round %d); not waiting for it",
                     self.node, msg.sender, msg.round)
            return False
        if msg.type is MessageType.HELLO:
            self._mark_present(msg.sender)
            self.finished.pop(msg.sender, None)
            if 0 < msg.round < self.current:
                # It resumes behind: its messages for this node's rounds are past, so waiting for
                # it would cost a deadline; it is waited for again once it catches up.
                self._absent.add(msg.sender)
                log.info("node %d: node %d resumes at round %d, behind this node's round %d; not waiting for it "
                         "until it catches up", self.node, msg.sender, msg.round, self.current)
            return False
        exchange = exchange_of(msg)
        name = msg.type.name
        if msg.round < self.current:
            self.refusal = "past round"
            log.debug("node %d: dropped late %s from node %d for round %d (now at round %d)",
                      self.node, name, msg.sender, msg.round, self.current)
            return False
        if msg.round > self.current + self.future_rounds:
            self.refusal = "round beyond the window"
            log.debug("node %d: dropped %s from node %d for round %d, beyond the buffer of %d rounds "
                      "after round %d", self.node, name, msg.sender, msg.round, self.future_rounds, self.current)
            return False
        slot = self._held.setdefault((msg.round, exchange, msg.type), {})
        if msg.sender in slot:
            self.refusal = "duplicate"
            log.debug("node %d: dropped duplicate %s from node %d for round %d, exchange %d", self.node, name,
                      msg.sender, msg.round, exchange)
            return False
        slot[msg.sender] = msg
        self._latest[msg.sender] = max(self._latest.get(msg.sender, (0, 0)), (msg.round, exchange))
        self._mark_present(msg.sender)
        return True

    def _mark_present(self, sender: int) -> None:
        self._present.add(sender)
        self._absent.discard(sender)
        self._changed.set()

    def advance(self, round_: int) -> None:
        """Start round ``round_``: forget everything held for earlier rounds."""
        self.current = round_
        for key in [k for k in self._held if k[0] < round_]:
            del self._held[key]

    def close(self) -> None:
        """Make every current and future wait raise :class:`Abandoned` (the node is stopping)."""
        self._closed = True
        self._changed.set()

    def check_open(self) -> None:
        """Raise :class:`Abandoned` if the node has been told to stop."""
        if self._closed:
            raise Abandoned

    def _pending(self, at: tuple[int, int], kind: MessageType, senders: Collection[int]) -> list[int]:
        got = self._held.get((*at, kind), {})
        return [j for j in senders
                if j not in got and j not in self._absent and self._latest.get(j, (0, 0)) <= at]

    def _give_up(self, peers: Collection[int], why: str) -> None:
        if peers:
            log.warning("node %d: %s from nodes %s; not waiting for them until they are heard again",
                        self.node, why, sorted(peers))
        self._absent.update(peers)

    async def _wait(self, deadline: float, done: Callable[[], bool]) -> None:
        """Sleep until ``done()`` holds, the loop time passes ``deadline``, or the inbox closes."""
        loop = asyncio.get_running_loop()
        while not self._closed and not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return
        if self._closed:
            raise Abandoned

    async def collect(self, round_: int, kind: MessageType, senders: Collection[int],
                      deadline: float, exchange: int = 0) -> dict[int, Message]:
        """Round ``round_``'s ``kind`` messages of ``exchange`` from ``senders``, once all are in
        or ``deadline`` (event-loop time) passes; peers that miss it are marked absent (module
        docstring)."""
        at = (round_, exchange)
        await self._wait(deadline, lambda: not self._pending(at, kind, senders))
        self._give_up(self._pending(at, kind, senders),
                      f"no {kind.name} for round {round_}{f', exchange {exchange}' if exchange else ''} in time")
        got = self._held.get((*at, kind), {})
        return {j: got[j] for j in senders if j in got}

    async def wait_present(self, peers: Collection[int], deadline: float, give_up: bool = True) -> set[int]:
        """Wait until every peer has sent anything (or ``deadline``); return those still missing,
        which are marked absent (unless not ``give_up``)."""
        await self._wait(deadline, lambda: self._present.issuperset(peers))
        missing = set(peers) - self._present
        if give_up:
            self._give_up(missing, "no word at start-up")
        return missing
