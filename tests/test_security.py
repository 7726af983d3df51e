"""CurveZMQ security: strangers and plaintext peers cannot deliver, keys on disk stay private."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from p2prec.cli import main
from p2prec.config import load
from p2prec.node.security import (
    CurveSecurity,
    Keypair,
    SecurityError,
    generate_keys,
    load_keypair,
    load_public_key,
    node_keys,
    sender_of,
    topology_keys,
)

WAIT_MS = 5000
"""Upper bound on any wait here; a passing run waits for events, not for this."""
FAILED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Keypair]:
    generate_keys(tmp_path, ["server", "friend", "stranger"])
    return {name: load_keypair(tmp_path / f"{name}.key_secret") for name in ("server", "friend", "stranger")}


@pytest.fixture()
def server(keys: dict[str, Keypair]) -> Iterator[tuple[zmq.Socket, zmq.Socket, str]]:
    """A secured ROUTER on 127.0.0.1 admitting only ``friend``, with a monitor of its handshakes."""
    ctx = zmq.Context()
    with CurveSecurity(ctx, keys["server"], [keys["friend"].public]) as curve:
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        curve.serve(router)
        monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        yield router, monitor, f"tcp://127.0.0.1:{port}"
        router.disable_monitor()
        monitor.close(linger=0)
        router.close(linger=0)
    ctx.term()


@pytest.fixture()
def client_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def next_handshake(monitor: zmq.Socket) -> int:
    assert monitor.poll(WAIT_MS), "no handshake event within the time limit"
    return int(recv_monitor_message(monitor)["event"])


def dealer(ctx: zmq.Context, endpoint: str, me: Keypair | None, server_key: bytes | None) -> zmq.Socket:
    """A DEALER that connects and sends one message; hold on to it, or its collection drops
    the connection mid-handshake."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if me is not None and server_key is not None:
        CurveSecurity(ctx, me, []).dial(sock, server_key)
    sock.connect(endpoint)
    sock.send_multipart([b"round 1"])
    return sock


def test_a_listed_key_delivers_and_is_identified(server: tuple, keys: dict[str, Keypair],
                                                  client_ctx: zmq.Context) -> None:
    router, monitor, endpoint = server
    peer = dealer(client_ctx, endpoint, keys["friend"], keys["server"].public)
    assert next_handshake(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert router.poll(WAIT_MS)
    frames = router.recv_multipart(copy=False)
    assert frames[-1].bytes == b"round 1"
    assert sender_of(frames[-1], {7: keys["friend"].public, 8: keys["stranger"].public}) == 7
    with pytest.raises(SecurityError, match="not on the allow-list"):
        sender_of(frames[-1], {8: keys["stranger"].public})
    peer.close()


def test_an_unknown_key_cannot_deliver(server: tuple, keys: dict[str, Keypair], client_ctx: zmq.Context) -> None:
    router, monitor, endpoint = server
    peer = dealer(client_ctx, endpoint, keys["stranger"], keys["server"].public)
    assert next_handshake(monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert not router.poll(300)
    peer.close()


def test_a_plaintext_peer_is_refused(server: tuple, client_ctx: zmq.Context) -> None:
    router, monitor, endpoint = server
    peer = dealer(client_ctx, endpoint, None, None)
    assert next_handshake(monitor) in FAILED  # a mechanism mismatch, or the connection cut first
    assert not router.poll(300)
    peer.close()


def test_a_client_with_the_wrong_server_key_cannot_deliver(server: tuple, keys: dict[str, Keypair],
                                                           client_ctx: zmq.Context) -> None:
    router, monitor, endpoint = server
    peer = dealer(client_ctx, endpoint, keys["friend"], keys["stranger"].public)
    assert next_handshake(monitor) in FAILED
    assert not router.poll(300)
    peer.close()


def test_serving_without_the_allow_list_running_is_refused(keys: dict[str, Keypair]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(SecurityError, match="not running"):
            CurveSecurity(ctx, keys["server"], [keys["friend"].public]).serve(sock)
    finally:
        sock.close(linger=0)
        ctx.term()


def test_secret_keys_are_written_0600_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        created.append((str(path), mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)  # the most permissive umask must not loosen anything
    try:
        generate_keys(tmp_path / "keys", ["a", "b"])
    finally:
        os.umask(old)
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / "keys" / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "keys" / f"{name}.key").stat().st_mode) == 0o644
    assert all(mode == 0o600 for path, mode in created if "key_secret" in path)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["a.key", "a.key_secret", "b.key", "b.key_secret"]


def test_key_files_are_zeromq_certificates(tmp_path: Path) -> None:
    publics = generate_keys(tmp_path, ["n0", "n1"])
    assert set(zmq.auth.load_certificates(tmp_path)) == set(publics.values())
    assert load_public_key(tmp_path / "n1.key") == publics["n1"]
    assert zmq.curve_public(load_keypair(tmp_path / "n0.key_secret").secret) == publics["n0"]


def test_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["a"])
    before = (tmp_path / "a.key_secret").read_bytes()
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        generate_keys(tmp_path, ["b", "a"])
    assert (tmp_path / "a.key_secret").read_bytes() == before and not (tmp_path / "b.key").exists()
    with pytest.raises(SecurityError, match="key name"):
        generate_keys(tmp_path, ["../evil"])


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["a", "b"])
    with pytest.raises(SecurityError, match="does not exist"):
        load_keypair(tmp_path / "missing.key_secret")
    with pytest.raises(SecurityError, match="holds no secret"):
        load_keypair(tmp_path / "a.key")
    (tmp_path / "b.key_secret").chmod(0o644)
    with pytest.raises(SecurityError, match="accessible by others"):
        load_keypair(tmp_path / "b.key_secret")


def topology(keys: dict[int, bytes]) -> nx.Graph:
    graph = nx.cycle_graph(3)
    for node, key in keys.items():
        graph.nodes[node]["key"] = key.decode()
    return graph


def test_a_secured_node_refuses_to_start_without_its_keys(tmp_path: Path) -> None:
    publics = generate_keys(tmp_path, ["node0", "node1", "node2"])
    graph = topology({i: publics[f"node{i}"] for i in range(3)})
    cfg = load(None, ["security.enabled=true", f"security.key_dir={tmp_path}"]).security
    mine = node_keys(cfg, 1, graph)
    assert mine.keypair.public == publics["node1"] and set(mine.peers) == {0, 2}
    with pytest.raises(SecurityError, match="node5.key_secret does not exist"):
        node_keys(cfg, 5, graph)
    empty = load(None, ["security.enabled=true", f"security.key_dir={tmp_path / 'nowhere'}"]).security
    with pytest.raises(SecurityError, match="does not exist"):
        node_keys(empty, 0, graph)
    with pytest.raises(SecurityError, match="does not match"):
        node_keys(cfg, 0, topology({0: publics["node2"], 1: publics["node1"], 2: publics["node2"]}))
    with pytest.raises(SecurityError, match="node 2 has no 'key'"):
        topology_keys(topology({0: publics["node0"], 1: publics["node1"]}))
    with pytest.raises(SecurityError, match="not a Z85"):
        topology_keys(topology({0: b"x" * 39, 1: publics["node1"], 2: publics["node2"]}))
    # security.enabled alone is a complete config (the launcher makes the keys); a node
    # holding it refuses to start without them.
    with pytest.raises(SecurityError, match="neither security.secret_key nor security.key_dir"):
        node_keys(load(None, ["security.enabled=true"]).security, 0, graph)


def test_keys_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "--count", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["node0", "node1", "node2"]
    assert all(len(line.split()[1]) == 40 for line in lines)
    assert stat.S_IMODE((tmp_path / "node2.key_secret").stat().st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(tmp_path), "--names", "node1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["keys", "generate", "--out", str(tmp_path), "--names", "alice,bob"]) == 0
    assert (tmp_path / "bob.key").is_file()


@pytest.mark.slow
def test_a_real_secured_node_refuses_each_impostor_and_says_why(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                                tiny_cfg) -> None:
    """A real ``p2prec-node`` process, node 1 of the path 0 - 1 - 2 - 3, secured. Against it:
    a stranger's key, node 3's key (listed in the topology, not a neighbour), node 0's key
    claiming to be node 2, and a plaintext peer: each is refused, and the log names why.
    Node 0's key speaking as node 0 is heard (its bye is logged)."""
    from p2prec.wire import Message, MessageType, encode
    from tests.node_support import Procs, make_backbone, node_config, wait_for

    assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--count", "4"]) == 0
    pairs = {i: load_keypair(tmp_path / "keys" / f"node{i}.key_secret") for i in range(4)}
    graph = nx.path_graph(4)
    for i in graph.nodes:
        graph.nodes[i]["key"] = pairs[i].public.decode()
    config = node_config(tmp_path, synth_dir, graph, ["sim.nodes=4", "run.rounds=1", "security.enabled=true",
                                                      f"security.key_dir={tmp_path / 'keys'}",
                                                      "node.start_timeout_s=120"])
    address = next(n["address"] for n in json.loads((tmp_path / "topology.json").read_text())["nodes"] if n["id"] == 1)
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    ctx = zmq.Context()
    socks = []

    def speak(me: Keypair | None, kind: MessageType, sender: int) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTING_ID, b"n%d" % sender)
        if me is not None:
            CurveSecurity(ctx, me, []).dial(sock, pairs[1].public)
        sock.connect(address)
        sock.send_multipart(encode(Message(kind, sender, 0, "none", {}, {})))
        socks.append(sock)

    try:
        node = procs.start(1)
        wait_for(lambda: "listening on" in procs.log(1), 120, "node 1 to listen")
        speak(Keypair(*zmq.curve_keypair()), MessageType.HELLO, 0)
        wait_for(lambda: "refused a handshake with a key not on the allow-list from an unknown connection"
                 in procs.log(1), 30, "the stranger's refusal")
        speak(pairs[3], MessageType.HELLO, 3)
        wait_for(lambda: "refused a handshake from a listed node that is not a neighbour from node 3"
                 in procs.log(1), 30, "the non-neighbour's refusal")
        speak(pairs[0], MessageType.HELLO, 2)
        wait_for(lambda: "refused a sender id that is not its key's from node 0 (header says node 2, the key is "
                         "node 0's)" in procs.log(1), 30, "the impostor's refusal")
        speak(None, MessageType.HELLO, 0)
        wait_for(lambda: "security.enabled differs" in procs.log(1), 30, "the plaintext peer's refusal")
        speak(pairs[0], MessageType.BYE, 0)
        wait_for(lambda: "node 0 has finished the run" in procs.log(1), 30, "node 0's bye")
        node.terminate()
        assert node.wait(60) == 0
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
        procs.close()
    log = procs.log(1)
    assert "node 2 has finished" not in log and "node 3 has finished" not in log
