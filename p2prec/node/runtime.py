"""The node's life: greet its peers, run rounds, persist each one, and stop cleanly on a signal.

Why this order inside a round: the round is computed, then its metrics are appended, then
the checkpoint is written. The checkpoint is the commit point: after a crash the node
resumes from the round it names, first dropping any metrics lines written after it, so
``metrics.jsonl`` never counts a round twice. On SIGINT or SIGTERM the current round is
abandoned (its partial state is never checkpointed), the sockets are closed, and the
process exits 0; restarting it redoes that round from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zmq

from p2prec.atomic import write_text_atomic
from p2prec.config import Config, ConfigError
from p2prec.gossip.stack import GossipStack
from p2prec.node.async_loop import AsyncInbox, run_async
from p2prec.node.inbox import Abandoned, Inbox
from p2prec.node.join import JOIN_TYPES, JoinDesk, adopt
from p2prec.node.learner import Learner
from p2prec.node.place import FLAT, Place
from p2prec.node.protocol import Protocol, RoundResult
from p2prec.node.rejections import UNKNOWN, Rejections
from p2prec.node.security import NodeKeys, SecurityError
from p2prec.node.transport import Transport, routing_id
from p2prec.run import checkpoint
from p2prec.run.folder import make_record, traffic
from p2prec.wire import Message, MessageType, WireError, encode, validate_and_decode
from p2prec.wire.message import exchange_of

log = logging.getLogger(__name__)

RNG = "rng/torch"
FEEDBACK = "feedback/"
METRICS = "metrics.jsonl"
ROUNDS = "rounds.jsonl"
GREET_NOTE_S = 10.0
"""While waiting for neighbours at start-up, a log line every this many seconds."""


@dataclass
class Progress:
    """Counters that continue across restarts (stored in the checkpoint's header)."""

    round: int = 0
    bytes_sent_total: int = 0
    wall_s: float = 0.0
    bytes_received_total: int = 0


class _Refused(Exception):
    """A message broke one of the node's own rules: ``reason`` (a fixed phrase) and its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class Node:
    """A real node: ``place`` in the topology, ``learner`` for its data (``None`` if aggregator-only).

    ``keys`` are required exactly when ``security.enabled``: a secured node never falls
    back to plaintext, and a node given keys never runs unsecured by mistake.

    What it accepts is fixed once, from ``gossip.codec`` and the shared adapter's shapes:
    exactly that codec's payload, from its peers only (one :class:`WireSpec`, which the
    validator caches per spec). A compressing codec and a robust rule need flat gossip:
    the simulator models an edge hierarchy's aggregator messages as exact and refuses a
    robust rule there (clients take their aggregator's average), so real nodes of a
    hierarchy could not match it.
    """

    def __init__(self, cfg: Config, place: Place, learner: Learner | None, template: dict[str, np.ndarray],
                 state_dir: Path, keys: NodeKeys | None = None) -> None:
        if cfg.security.enabled != (keys is not None):
            raise SecurityError(f"node {place.node}: security.enabled is {cfg.security.enabled} but keys were "
                                f"{'not ' if keys is None else ''}given")
        self.stack = GossipStack.from_config(cfg, learner.pop.shared() if learner is not None else None,
                                             [place.node], secret=not cfg.privacy.seeded_noise)
        codec = self.stack.codec
        robust = "mean" if self.stack.aggregation is None else \
            f"{cfg.robust.rule} (trackers: {cfg.robust.tracker_rule})"
        # Privacy: a client's message carries its sample count in the clear, which the
        # accountant does not cover (p2prec.gossip.privacy), so it is not released at all.
        flat_only = {"gossip.codec": (codec.name, "none"), "robust.rule": (robust, "mean"),
                     "privacy.enabled": (cfg.privacy.enabled, False)}
        for key, (value, plain) in flat_only.items():
            if place.kind != FLAT and value != plain:
                raise ConfigError(f"{key}: real nodes of an edge hierarchy support only {plain!r} so far, "
                                  f"got {value!r}")
        self.cfg = cfg
        self.keys = keys
        self.place = place
        self.learner = learner
        self.shapes = {k: v.shape for k, v in template.items()}
        self.spec = codec.wire_spec(self.shapes, known_senders=frozenset(place.peers))
        self.feedback = self.stack.feedback()
        if self.stack.privacy is not None and cfg.privacy.seeded_noise:
            log.warning("%s: privacy.seeded_noise is on: anyone holding this config regenerates the noise, so "
                        "the reported epsilon protects nothing; use it only to compare with the simulator",
                        f"node {place.node}")
        self.state_dir = state_dir
        self.ckpt_path = state_dir / checkpoint.FILE_NAME
        self.progress = Progress()
        self.joins = JoinDesk(place.node, cfg.run.rounds)
        self.name = f"node {place.node}"
        self.rejections = Rejections(self.name, cfg.node.summary_s)
        self._wall_base, self._wall_start = 0.0, time.perf_counter()

    # --- persistence -------------------------------------------------------------------

    def resume(self, fresh: bool = False) -> None:
        """Load the last checkpoint (or write round 0's), and drop records of rounds after it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in (checkpoint.FILE_NAME, METRICS, ROUNDS):
                (self.state_dir / name).unlink(missing_ok=True)
        if not self.ckpt_path.exists():
            self._save()
            return
        ckpt = checkpoint.load(self.ckpt_path, self.place.node)
        tensors = dict(ckpt.tensors)
        rng = tensors.pop(RNG, None)
        residual = {k[len(FEEDBACK):]: tensors.pop(k) for k in list(tensors) if k.startswith(FEEDBACK)}
        if self.feedback is not None:
            if residual and residual.keys() != self.shapes.keys():
                raise checkpoint.CheckpointError(f"checkpoint {self.ckpt_path}: its error-feedback residual does "
                                                 f"not fit this config's shared adapter")
            self.feedback.residual = residual
        if self.learner is not None:
            try:
                self.learner.load_state(tensors)
            except ValueError as exc:
                raise checkpoint.CheckpointError(f"checkpoint {self.ckpt_path} does not fit this config: {exc}") \
                    from None
        if rng is not None:
            torch.set_rng_state(rng)
        info = ckpt.info
        self.progress = Progress(ckpt.round, int(info.get("bytes_sent_total", 0)), float(info.get("wall_s", 0.0)),
                                 int(info.get("bytes_received_total", 0)))
        if self.stack.privacy is not None:  # a node releases in every round it trains, so this is its count
            self.stack.privacy.releases = self.stack.training_rounds(ckpt.round)
        for name in (METRICS, ROUNDS):
            self._truncate(self.state_dir / name, ckpt.round)
        log.info("%s: resuming after round %d from %s", self.name, ckpt.round, self.ckpt_path)

    def _truncate(self, path: Path, last_round: int) -> None:
        """Keep the lines of rounds up to ``last_round``; a torn last line from a crash goes too."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["round"] <= last_round:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_text_atomic(path, "".join(kept))

    def _save(self) -> None:
        tensors = {RNG: torch.get_rng_state()}
        if self.feedback is not None:
            tensors.update({FEEDBACK + k: v for k, v in self.feedback.residual.items()})
        if self.learner is not None:
            tensors.update(self.learner.state())
        p = self.progress
        checkpoint.save(self.ckpt_path, checkpoint.Checkpoint(
            self.place.node, p.round, tensors, {"bytes_sent_total": p.bytes_sent_total, "wall_s": p.wall_s,
                                                "bytes_received_total": p.bytes_received_total}))

    def _append(self, name: str, record: dict) -> None:
        with (self.state_dir / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    # --- network -------------------------------------------------------------------------

    def open_transport(self) -> Transport:
        """This node's sockets, bound and connected (secured when the node has keys)."""
        n = self.cfg.node
        return Transport(self.place.node, n.bind or self.place.address, self.place.peers, hwm=n.hwm,
                         linger_ms=n.linger_ms, max_frame_bytes=4 * (self.spec.max_bytes + 65536), keys=self.keys,
                         report=self.rejections.count)

    def _peer_of(self, routing: bytes, frames: list[zmq.Frame], transport: Transport) -> int | str:
        """Who a connection is, for counting what it sends: the neighbour its key (with security)
        or its routing id (without) names, else ``an unknown connection``."""
        try:
            owner = transport.key_owner(frames)
        except SecurityError:
            return UNKNOWN
        if owner is not None:
            return owner
        for peer in self.place.peers:
            if routing == routing_id(peer):
                return peer
        return UNKNOWN

    def _accept(self, routing: bytes, frames: list[zmq.Frame], inbox: Inbox, transport: Transport) -> None:
        """Validate one received message and file it; count every refusal (:mod:`p2prec.node.rejections`).

        Identity: with security, the key that authenticated the connection names the sender
        and the routing id is ignored (it is random, see :mod:`p2prec.node.transport`);
        without, the routing id ``n<id>`` is the identity the header must repeat.
        """
        peer = self._peer_of(routing, frames, transport)
        try:
            msg = validate_and_decode(frames, self.spec)
            owner = transport.key_owner(frames)
            if owner is None and routing != routing_id(msg.sender):
                raise _Refused("a sender id that is not its connection's",
                               f"header says node {msg.sender}, the connection is {routing[:16]!r}")
            if owner is not None and owner != msg.sender:
                raise _Refused("a sender id that is not its key's",
                               f"header says node {msg.sender}, the key is node {owner}'s")
            if msg.type not in (MessageType.HELLO, MessageType.BYE):
                codec = self.stack.codec
                if msg.codec != codec.name:
                    raise _Refused("another codec", f"codec {msg.codec!r}, this network's gossip.codec is "
                                                    f"{codec.name!r}")
                if msg.sender not in self.place.senders.get(msg.type, ()):
                    raise _Refused("a message type this peer may not send",
                                   f"node {msg.sender} may not send {msg.type.name} to this node")
                exchange = exchange_of(msg)
                if exchange >= self.stack.exchanges:
                    raise _Refused("an exchange beyond gossip.exchanges",
                                   f"exchange {exchange}, gossip.exchanges = {self.stack.exchanges}")
                if not codec.passthrough and msg.type is not MessageType.JOIN_REQUEST:
                    # plain float32 under its own names is mixed as received; ``combine`` copies it once
                    decoded = codec.decode(msg.tensors, self.shapes)
                    msg = replace(msg, tensors={k: v.numpy() for k, v in decoded.items()})
            if msg.type in JOIN_TYPES:
                self.joins.take(msg, inbox)
                return
        except _Refused as exc:
            self.rejections.count(peer, exc.reason, exc.detail)
            return
        except (WireError, SecurityError) as exc:
            self.rejections.count(peer, "an invalid message", str(exc))
            return
        if not inbox.offer(msg) and inbox.refusal not in ("", "past round"):  # late is normal, not hostile
            self.rejections.count(msg.sender, f"a message for a {inbox.refusal}" if "round" in inbox.refusal
                                  else f"a {inbox.refusal} message", f"{msg.type.name} for round {msg.round}")

    async def receive(self, transport: Transport, inbox: Inbox) -> None:
        """File every message ``transport`` receives into ``inbox``, until cancelled."""
        while True:
            routing, frames = await transport.recv()
            self._accept(routing, frames, inbox, transport)

    async def _greet(self, transport: Transport, inbox: Inbox) -> None:
        """Say hello to every peer, then wait (bounded) until each has been heard from at least once.

        Why: peers start seconds apart; without this, early nodes would spend their first
        round's deadline on neighbours that are still loading. Peers never heard from are
        marked absent, so the rounds do not wait for them until they show up.
        """
        hello = encode(Message(MessageType.HELLO, self.place.node, self.progress.round + 1, "none", {}, {}))
        for peer in self.place.peers:
            await transport.send(peer, hello)
        loop, timeout = asyncio.get_running_loop(), self.cfg.node.start_timeout_s
        deadline = loop.time() + timeout
        missing = set(self.place.peers)
        while True:  # a person watching the log sees what the node waits for, not silence
            missing = await inbox.wait_present(self.place.peers, min(deadline, loop.time() + GREET_NOTE_S),
                                               give_up=False)
            if not missing or loop.time() >= deadline:
                break
            log.info("%s: waiting for nodes %s to say hello (%.0f s of node.start_timeout_s = %.0f s); if they "
                     "have already finished the run, none will", self.name, sorted(missing),
                     timeout - (deadline - loop.time()), timeout)
        if missing and missing == set(self.place.peers) and self.progress.round > 0:
            log.warning("%s: no neighbour answered in %.0f s. This node resumes after round %d: if its neighbours "
                        "have finished the run meanwhile, they are gone, and it runs rounds %d-%d alone",
                        self.name, timeout, self.progress.round, self.progress.round + 1, self.cfg.run.rounds)
        await inbox.wait_present(self.place.peers, loop.time())

    async def _farewell(self, transport: Transport) -> None:
        """Tell every peer this node has finished the run, so none waits for it again."""
        bye = encode(Message(MessageType.BYE, self.place.node, self.progress.round, "none", {}, {}))
        for peer in self.place.peers:
            await transport.send(peer, bye)

    # --- rounds --------------------------------------------------------------------------

    def _wall(self) -> float:
        """Seconds this node has run, summed over its restarts."""
        return self._wall_base + time.perf_counter() - self._wall_start

    def _finish_round(self, round_: int, result: RoundResult, started: float, extra: dict | None = None) -> None:
        """Metrics (on evaluation rounds), checkpoint, the ``rounds.jsonl`` line (with ``extra``) and the log line."""
        p = self.progress
        p.round = round_
        p.bytes_sent_total += result.bytes_sent
        p.bytes_received_total += result.bytes_received
        rounds = self.cfg.run.rounds
        loss = None if math.isnan(result.loss) else result.loss
        eval_s, note = 0.0, ""
        if self.learner is not None and (round_ % self.cfg.eval.every == 0 or round_ == rounds):
            t0 = time.perf_counter()
            metrics = self.learner.evaluate()
            eval_s = time.perf_counter() - t0
            eps = self.stack.epsilon()
            self._append(METRICS, make_record(round_, metrics, loss, None, p.bytes_sent_total, self._wall(),
                                              node=self.place.node, users=len(self.learner.users), epsilon=eps,
                                              **traffic(p.bytes_sent_total, p.bytes_received_total, 1, round_)))
            val = metrics["val"][self.cfg.eval.select_protocol][self.cfg.eval.select_metric]
            note = f", val {self.cfg.eval.select_metric} {val:.4f}"
            if eps is not None:
                note += f", epsilon {eps:.3g}"
        p.wall_s = self._wall()
        t0 = time.perf_counter()
        self._save()
        checkpoint_s = time.perf_counter() - t0
        round_s = time.perf_counter() - started
        self._append(ROUNDS, {"round": round_, "heard": result.heard, "expected": result.expected,
                              "local_s": result.local_s, "eval_s": eval_s, "checkpoint_s": checkpoint_s,
                              "round_s": round_s, "bytes_sent": result.bytes_sent,
                              "bytes_received": result.bytes_received, "loss": loss, **(extra or {})})
        log.info("%s round %d/%d: loss %.4f, heard %d/%d, %.2f s (local %.2f s)%s", self.name, round_, rounds,
                 result.loss, result.heard, result.expected, round_s, result.local_s, note)

    async def _join(self, transport: Transport, inbox: Inbox, protocol: Protocol) -> None:
        """Start from the most advanced neighbour's shared state, if one is ahead (:mod:`p2prec.node.join`)."""
        if self.learner is None or self.place.kind != FLAT:
            log.info("%s: not asking to join: in an edge hierarchy the aggregator hands down its state every "
                     "round", self.name)
            return
        n = self.cfg.node
        answer = await self.joins.ask(transport, inbox, sorted(self.place.peers), self.stack.codec, self.progress.round,
                                      n.start_timeout_s, n.deadline_s)
        if answer is None:
            log.info("%s: no neighbour is ahead of round %d; starting from its own state", self.name,
                     self.progress.round)
            return
        adopt(self.learner, answer)
        self.progress.round = answer.round
        protocol.first_round = answer.round + 1
        self._save()
        log.info("%s: joined from node %d's shared state after round %d", self.name, answer.sender, answer.round)

    async def _rounds(self, transport: Transport, inbox: Inbox, protocol: Protocol, join: bool) -> None:
        """The synchronous rounds, after joining (if asked) and greeting the neighbours."""
        if join:
            await self._join(transport, inbox, protocol)
        await self._greet(transport, inbox)
        for round_ in range(self.progress.round + 1, self.cfg.run.rounds + 1):
            inbox.advance(round_)
            started = time.perf_counter()
            result = await protocol.run(round_)
            self._finish_round(round_, result, started)
            if self.learner is not None:
                await self.joins.answer(transport, self.learner, self.stack.codec, round_)

    async def run(self, join: bool = False) -> int:
        """Run the remaining rounds; return the last complete round. Never raises on SIGINT/SIGTERM.

        ``join``: first ask the neighbours for their shared state (flat topologies, sync mode only;
        an async node needs no join, :mod:`p2prec.node.async_loop`)."""
        loop = asyncio.get_running_loop()
        self._wall_base, self._wall_start = self.progress.wall_s, time.perf_counter()
        asynchronous = self.cfg.gossip.mode == "async"
        inbox = AsyncInbox(self.cfg.gossip.max_staleness, self.progress.round) if asynchronous else \
            Inbox(self.place.node, self.cfg.node.future_rounds, self.progress.round + 1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig, inbox)
        n = self.cfg.node
        transport = self.open_transport()
        log.info("%s (%s) listening on %s%s, peers %s", self.name, self.place.kind, transport.endpoint,
                 " (CurveZMQ)" if self.keys is not None else "", sorted(self.place.peers))
        receiver = loop.create_task(self.receive(transport, inbox))
        watcher = loop.create_task(transport.watch())
        summaries = loop.create_task(self.rejections.summarise_every())
        protocol = Protocol(self.place, self.learner, inbox, transport, n.deadline_s,
                            first_round=self.progress.round + 1, start_timeout_s=n.start_timeout_s,
                            stack=self.stack, feedback=self.feedback, on_reject=self.rejections.count)
        try:
            inbox.check_open()
            if asynchronous:  # no join, no greeting: it starts at once and mixes what arrives
                await run_async(self, inbox, transport)
            else:
                await self._rounds(transport, inbox, protocol, join)
            await self._farewell(transport)
        except Abandoned:
            log.info("%s: stopping; round %d abandoned, the checkpoint of round %d stands", self.name,
                     self.progress.round + 1, self.progress.round)
        finally:
            for task in (receiver, watcher, summaries):
                task.cancel()
            await asyncio.gather(receiver, watcher, summaries, return_exceptions=True)
            transport.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self.rejections.summarise(force=True)
        log.info("%s: done after round %d; %d messages or handshakes refused", self.name, self.progress.round,
                 len(self.rejections))
        return self.progress.round

    def _on_signal(self, sig: signal.Signals, inbox: Inbox) -> None:
        log.info("%s: %s received; abandoning the round in progress", self.name, signal.Signals(sig).name)
        inbox.close()
