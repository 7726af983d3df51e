"""A node's sockets: one ROUTER bound for everything it receives, one DEALER per peer it sends to.

Why this shape (docs/design.md, section 6): a DEALER queues messages for a peer that is not up yet
(up to its high-water mark) and reconnects by itself after that peer restarts, so start-up
order and crashes need no code here. The ROUTER reports the connection each message came
on (the sender's routing id), which the node checks against the header's sender id.
Sends never block: when a peer's queue is full the message is dropped and logged, because
a round must not stall on a dead peer. ``MAXMSGSIZE`` makes ZeroMQ itself disconnect a
peer that sends a frame far larger than any valid message, before the node allocates it;
every smaller hostile message reaches the validator, which rejects and logs it.

With ``keys`` (``security.enabled``) every socket speaks CurveZMQ: the ROUTER is a Curve
server whose ZAP allow-list is the topology's public keys, so a stranger or a plaintext
peer fails the handshake and never delivers a byte; each DEALER is a Curve client that
checks it reached the peer holding that peer's key. The routing id is merely claimed by
the sender, so :meth:`Transport.key_owner` names the node whose key authenticated a
message, which the node checks against the header's sender.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq
import zmq.asyncio

from p2prec.node.security import CurveSecurity, NodeKeys, sender_of

log = logging.getLogger(__name__)

Frame = bytes | memoryview


class TransportError(ValueError):
    """The node cannot bind or connect its sockets; the message names the endpoint."""


def routing_id(node: int) -> bytes:
    """The routing id a node's DEALERs present; receivers check it against the header's sender."""
    return b"n%d" % node


class Transport:
    """The sockets of node ``node``: bound at ``bind``, connected to every peer in ``peers``;
    secured with CurveZMQ when ``keys`` are given (see the module docstring)."""

    def __init__(self, node: int, bind: str, peers: dict[int, str], *, hwm: int, linger_ms: int,
                 max_frame_bytes: int, keys: NodeKeys | None = None) -> None:
        self.node = node
        self.keys = keys
        self.ctx = zmq.asyncio.Context()
        self.curve = CurveSecurity(self.ctx, keys.keypair, keys.peers.values()) if keys is not None else None
        if self.curve is not None:
            self.curve.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.dealers: dict[int, zmq.asyncio.Socket] = {}
        self.full: set[int] = set()
        try:
            if self.curve is not None:
                self.curve.serve(self.router)
            self.router.bind(bind)
            for peer, address in peers.items():
                dealer = self.ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.ROUTING_ID, routing_id(node))
                dealer.setsockopt(zmq.SNDHWM, hwm)
                dealer.setsockopt(zmq.LINGER, linger_ms)
                self.dealers[peer] = dealer
                if self.curve is not None:
                    self.curve.dial(dealer, self.keys.peers[peer])
                dealer.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"node {node}: cannot bind {bind} or connect to its peers ({exc}); "
                                 f"set node.bind (e.g. tcp://*:PORT) if the address is not this machine's") from None
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()

    async def send(self, peer: int, frames: Sequence[Frame]) -> int:
        """Queue ``frames`` for ``peer`` without blocking; return the bytes queued (0 if dropped)."""
        try:
            await self.dealers[peer].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if peer not in self.full:
                log.warning("node %d: queue to node %d is full (%d messages); dropping messages to it until "
                            "it drains", self.node, peer, self.dealers[peer].getsockopt(zmq.SNDHWM))
                self.full.add(peer)
            return 0
        if peer in self.full:
            log.info("node %d: queue to node %d drains again", self.node, peer)
            self.full.discard(peer)
        return sum(memoryview(f).nbytes for f in frames)

    async def recv(self) -> tuple[bytes, list[zmq.Frame]]:
        """The next message: the routing id it came with, then its frames, received zero-copy."""
        parts = await self.router.recv_multipart(copy=False)
        return parts[0].bytes, parts[1:]

    def key_owner(self, frames: list[zmq.Frame]) -> int | None:
        """The node whose Curve key authenticated the connection ``frames`` came on, or ``None``
        on a plaintext transport, which cannot tell; :class:`SecurityError` if no listed key did."""
        if self.keys is None:
            return None
        return sender_of(frames[0], self.keys.peers)

    def close(self) -> None:
        """Close every socket; DEALERs get ``linger_ms`` to flush what is queued. The ZAP
        handler stops last: its sockets live in the same context, which cannot end before them."""
        for dealer in self.dealers.values():
            dealer.close()
        self.router.close()
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
