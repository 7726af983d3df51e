"""CurveZMQ security: strangers and plaintext peers cannot deliver, keys on disk stay private."""

from __future__ import annotations

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
from p2prec.config import ConfigError, load
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
    with pytest.raises(ConfigError, match="security.enabled"):
        load(None, ["security.enabled=true"])


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
