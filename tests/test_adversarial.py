"""Real node processes under attack: each defence has a test here that fails when it is deleted.

Nodes 0 and 1 are real ``p2prec-node`` processes on the triangle 0 - 1 - 2; the test plays
node 2, a neighbour turned attacker, over its own sockets, plaintext (no security, the
case where identities are merely claimed). In one run of four rounds it:

- says hello, then sends each node a gossip message for round 99 (far beyond the window):
  one forged far-future round must not make the nodes stop waiting for node 2;
- answers every round a second after the nodes' own messages arrive, so a node that had
  stopped waiting for it would not hear it;
- sends adapters filled with 50.0 in rounds 1 and 2 (the injection attack), then states of
  twice the honest norm in a random direction (bounded but wrong) in rounds 3 and 4;
- after round 1, opens a second connection to node 0 claiming node 1's routing id (the
  takeover attempt) and keeps saying hello as node 1 over it;
- floods node 0 with malformed messages during round 3.

The secured cases (a stranger's key, a listed non-neighbour's, a neighbour's key claiming
another id, plaintext at a secured node) run against a real secured node in
``tests/test_security.py``; the privacy attack is in ``tests/test_node_trust.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import zmq

from p2prec.config import load
from p2prec.gossip.codecs import get_codec
from p2prec.run import checkpoint
from p2prec.run.checkpoint import PARAM
from p2prec.topology.roles import CLIENT
from p2prec.wire import Message, MessageType, WireError, encode, validate_and_decode
from tests.node_support import Procs, make_backbone, node_config, node_params, rounds_done, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 4
FLOOD = 1500
ANSWER_AFTER_S = 3.0
"""The attacker answers this long after both nodes' messages of a round have reached it."""


@dataclass
class Attacked:
    folder: Path
    logs: dict[int, str]
    codes: dict[int, int]
    initial_norm: float
    names: list[str]


def _address(config: Path, node: int) -> str:
    topology = json.loads(Path(load(config).gossip.topology).read_text())
    return next(n["address"] for n in topology["nodes"] if n["id"] == node)


def _rounds(folder: Path, node: int) -> list[dict]:
    path = folder / f"node-{node}" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _norm(state: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in state.values())))


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path, synth_data, tiny_cfg) -> Attacked:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("attacked")
    graph = nx.complete_graph(3)
    nx.set_node_attributes(graph, CLIENT, "role")
    config = node_config(tmp, synth_dir, graph, [
        "sim.nodes=3", f"run.rounds={ROUNDS}", "gossip.tracking=false", "node.deadline_s=20",
        "node.start_timeout_s=60", "node.summary_s=2", f"eval.every={ROUNDS}"])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp / "bb"))
    folder = tmp / "nodes"
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def dealer(to: int, identity: bytes) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 20000)
        sock.connect(_address(config, to))
        socks.append(sock)
        return sock

    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(_address(config, 2))
        socks.append(router)
        for node in (0, 1):
            procs.start(node)
        wait_for(lambda: (folder / "node-0" / checkpoint.FILE_NAME).exists(), 120, "node 0's first checkpoint")
        initial = {k[len(PARAM):]: v[0].numpy() for k, v in
                   checkpoint.load(folder / "node-0" / checkpoint.FILE_NAME, 0).tensors.items()
                   if k.startswith(PARAM) and ".shared" in k}
        names = sorted(initial)
        spec = get_codec("none").wire_spec({k: v.shape for k, v in initial.items()}, frozenset({0, 1}))
        initial_norm = _norm(initial)
        rng = np.random.default_rng(0)

        def state(round_: int) -> dict[str, np.ndarray]:
            if round_ <= 2:   # the injection attack
                return {k: np.full_like(v, 50.0) for k, v in initial.items()}
            wrong = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
            scale = 2.0 * initial_norm / _norm(wrong)   # bounded but wrong: twice the honest norm
            return {k: v * scale for k, v in wrong.items()}

        to = {node: dealer(node, b"n2") for node in (0, 1)}
        for node, sock in to.items():
            sock.send_multipart(encode(Message(MessageType.HELLO, 2, 0, "none", {}, {})))
            sock.send_multipart(encode(Message(MessageType.GOSSIP, 2, 99, "none", state(3), {})))
        heard: dict[int, set[int]] = {}
        due: dict[int, float] = {}
        impostor = None
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs.procs.values()):
            assert time.monotonic() < deadline, "the attacked run did not finish in time"
            if router.poll(50):
                frames = router.recv_multipart(copy=False)
                try:
                    msg = validate_and_decode(frames[1:], spec)
                except WireError:
                    continue
                if msg.type is MessageType.GOSSIP:
                    heard.setdefault(msg.round, set()).add(msg.sender)
                    if heard[msg.round] == {0, 1} and msg.round not in due:
                        due[msg.round] = time.monotonic() + ANSWER_AFTER_S
            for round_, at in list(due.items()):
                if at is not None and time.monotonic() >= at:
                    due[round_] = None
                    frames = encode(Message(MessageType.GOSSIP, 2, round_, "none", state(round_), {}))
                    for node, sock in to.items():
                        try:
                            sock.send_multipart(frames, zmq.NOBLOCK)
                        except zmq.Again:   # the nodes finished without it
                            continue
                        if node == 0 and round_ == 3:
                            try:
                                for k in range(FLOOD):
                                    sock.send_multipart([b"\x93" + bytes([k % 256]) * 40, b"junk"])
                            except zmq.Again:
                                pass
            if impostor is None and rounds_done(folder, 0) >= 1:
                impostor = dealer(0, b"n1")   # the takeover attempt: node 1's routing id
            if impostor is not None:
                try:
                    impostor.send_multipart(encode(Message(MessageType.HELLO, 1, 0, "none", {}, {})), zmq.NOBLOCK)
                except zmq.Again:   # its queue is full: node 0 reads nothing from it (no takeover)
                    pass
        codes = procs.wait_all(30)
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
        procs.close()
    return Attacked(folder, {i: procs.log(i) for i in (0, 1)}, codes, initial_norm, names)


def test_the_attacked_run_completes(attacked: Attacked) -> None:
    assert attacked.codes == {0: 0, 1: 0}
    for node in (0, 1):
        assert [r["round"] for r in _rounds(attacked.folder, node)] == list(range(1, ROUNDS + 1))


def test_a_far_future_round_does_not_silence_its_sender(attacked: Attacked) -> None:
    """Node 1 keeps waiting for node 2 (which answers a second late) in every round, although
    node 2 claimed round 99 before round 1."""
    assert [r["heard"] for r in _rounds(attacked.folder, 1)] == [2] * ROUNDS
    assert "a message for a round beyond the window from node 2" in attacked.logs[1]


def test_a_claimed_id_cannot_take_over_an_established_link(attacked: Attacked) -> None:
    """After the impostor connected as node 1, node 0 still hears the real node 1."""
    assert [r["heard"] for r in _rounds(attacked.folder, 0)][1:] == [2] * (ROUNDS - 1)


def test_outrageous_states_are_dropped_and_bounded_ones_pull_only_so_far(attacked: Attacked) -> None:
    """The 50.0-filled states of rounds 1 and 2 are dropped by both nodes; the bounded ones of
    rounds 3 and 4 are accepted, and each moves a node by at most its weight (1/3) times
    (bound + 1) times the neighbourhood's scale, so the nodes' states stay of their scale."""
    for node in (0, 1):
        log = attacked.logs[node]
        assert log.count("refused state beyond the norm bound from node 2 (round 1") == 1, log[-3000:]
        assert "state beyond the norm bound from node 2" in log
        norm = _norm({k: v[0].numpy() for k, v in node_params(attacked.folder, node).items() if k in attacked.names})
        assert 0.2 * attacked.initial_norm < norm < 2.0 * attacked.initial_norm


def test_a_flood_is_counted_not_logged_line_by_line(attacked: Attacked) -> None:
    log = attacked.logs[0]
    refusal_lines = [line for line in log.splitlines() if "refused" in line]
    assert len(refusal_lines) < 30, refusal_lines[:40]
    done = next(line for line in log.splitlines() if "done after round" in line)
    assert int(done.split("; ")[1].split()[0]) >= FLOOD
    assert "x an invalid message from node 2" in log   # the periodic summary, per peer and reason
