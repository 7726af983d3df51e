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
server whose ZAP allow-list is the public keys of this node's *neighbours* (not every key
of the topology: a node that is not a neighbour has nothing to send here), so a stranger or
a plaintext peer fails the handshake and never delivers a byte; each DEALER is a Curve
client that checks it reached the peer holding that peer's key.

Who sent a message. A routing id is merely claimed by the connecting DEALER, so:

- with security, identity is the key that authenticated the connection
  (:meth:`Transport.key_owner`), never the routing id. Each DEALER presents a fresh random
  routing id, so no two connections ever claim the same one and no one can guess another's;
- without security, the routing id ``n<id>`` is the only identity there is, and
  ``ROUTER_HANDOVER`` stays off: a second connection claiming an id already connected is
  ignored by ZeroMQ, so it can never take over an established peer's link (a peer that
  restarts gets its id back once its old connection closes; heartbeats close a dead one).
  Without security a stranger can still claim an id no one holds yet: that is what
  security is for.

Refused handshakes are reported, with their reason, through ``report`` (a plaintext peer
at a secured node or the reverse, a wrong server key, a key not on the allow-list); the
node counts and rate-limits them (:mod:`p2prec.node.rejections`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from p2prec.node.security import CurveSecurity, NodeKeys, sender_of

log = logging.getLogger(__name__)

Frame = bytes | memoryview


class TransportError(ValueError):
    """The node cannot bind or connect its sockets; the message names the endpoint."""


def routing_id(node: int) -> bytes:
    """The routing id a plaintext node's DEALERs present; receivers check it against the header's sender."""
    return b"n%d" % node


Report = Callable[[int | str, str, str], None]
"""``report(peer, reason, detail)``: a refused handshake (see :class:`p2prec.node.rejections.Rejections`)."""

HEARTBEAT_MS = 2000
"""ZMTP heartbeats: a connection silent for three of them is closed (a peer that vanished
without closing it, e.g. a pulled cable, frees its routing id for its restart)."""

_HANDSHAKE = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def _handshake_reason(secured: bool, incoming: bool, event: int, value: int) -> tuple[str, str]:
    """(reason, detail) of a failed handshake as the monitor reports it."""
    mine, other = ("CurveZMQ", "plaintext") if secured else ("plaintext", "CurveZMQ")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return (f"a {other} handshake", f"this node speaks {mine}: security.enabled differs between the two "
                                        f"nodes' configs")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return ("a handshake under a wrong key", "the peer's topology file lists another public key for this "
                                                 "node, or the peer's secret key is not the one listed")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if incoming:
            return ("a key not on the allow-list", "ZAP refused it (see the line naming the key)")
        return ("our key, refused by the peer", "is this node's public key in the peer's topology file, and is "
                                                "this node its neighbour there?")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return ("a broken-off handshake", f"the peer hung up mid-handshake, as a {other} peer does at this "
                                          f"{mine} node when security.enabled differs between the two nodes' "
                                          f"configs (errno {value})")
    return ("a failed handshake", f"ZeroMQ event {event:#x}, value {value:#x}")


class Transport:
    """The sockets of node ``node``: bound at ``bind``, connected to every peer in ``peers``;
    secured with CurveZMQ when ``keys`` are given (see the module docstring)."""

    def __init__(self, node: int, bind: str, peers: dict[int, str], *, hwm: int, linger_ms: int,
                 max_frame_bytes: int, keys: NodeKeys | None = None, report: Report | None = None) -> None:
        self.node = node
        self.keys = keys
        self.report: Report = report or (lambda peer, reason, detail: None)
        self.ctx = zmq.asyncio.Context()
        # Only the neighbours' keys: they are the allow-list and the keys a sender is named by.
        self.peer_keys = {peer: keys.peers[peer] for peer in peers} if keys is not None else {}
        self.curve = CurveSecurity(self.ctx, keys.keypair, self.peer_keys.values(), others=keys.peers,
                                   report=self.report) if keys is not None else None
        if self.curve is not None:
            self.curve.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 0)   # see the module docstring: no takeover
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        self.dealers: dict[int, zmq.asyncio.Socket] = {}
        self.monitors: list[tuple[int | None, zmq.asyncio.Socket]] = []
        self.full: set[int] = set()
        try:
            if self.curve is not None:
                self.curve.serve(self.router)
            self.monitors.append((None, self.router.get_monitor_socket(_HANDSHAKE)))
            self.router.bind(bind)
            for peer, address in peers.items():
                dealer = self.ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.ROUTING_ID, routing_id(node) if keys is None
                                  else routing_id(node) + b"." + secrets.token_hex(8).encode())
                dealer.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
                dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
                self.monitors.append((peer, dealer.get_monitor_socket(_HANDSHAKE)))
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
        """The neighbour whose Curve key authenticated the connection ``frames`` came on, or
        ``None`` on a plaintext transport, which cannot tell; :class:`SecurityError` if no
        neighbour's key did."""
        if self.keys is None:
            return None
        return sender_of(frames[0], self.peer_keys)

    async def watch(self) -> None:
        """Report every failed handshake of this node's sockets, until cancelled."""
        poller = zmq.asyncio.Poller()
        sockets = {}
        for peer, mon in self.monitors:
            poller.register(mon, zmq.POLLIN)
            sockets[mon] = peer
        while True:
            for mon, _ in await poller.poll():
                event = parse_monitor_message(await mon.recv_multipart())
                peer = sockets[mon]
                if peer is None and event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    continue   # the allow-list reported it, naming the key
                reason, detail = _handshake_reason(self.keys is not None, peer is None, event["event"],
                                                   event["value"])
                if peer is None:
                    self.report("an unknown connection", reason, detail)
                else:
                    self.report(peer, reason, f"connecting to it: {detail}")

    def close(self) -> None:
        """Close every socket; DEALERs get ``linger_ms`` to flush what is queued. The ZAP
        handler stops last: its sockets live in the same context, which cannot end before them."""
        for _, mon in self.monitors:
            mon.close(linger=0)
        for dealer in self.dealers.values():
            dealer.close()
        self.router.close()
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
