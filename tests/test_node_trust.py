"""The trust features of a real node (CurveZMQ, codecs, robust rule, local DP), fast and in-process.

Over real sockets on 127.0.0.1, node 0 of the path 0 - 1 - 2 runs its own transport and
receive loop; the test plays its neighbour 1 (and impostors of it) with node transports
of its own. Every wait is bounded, and every socket, ZAP thread and task is closed before
a test ends. The per-round maths is checked against the simulator's row by row here, and
end to end with real processes in ``tests/test_node_net.py``.
"""

from __future__ import annotations

import asyncio
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import zmq

from p2prec.cli import main as p2prec_main
from p2prec.config import Config, ConfigError, load
from p2prec.gossip.aggregate import heard_row, robust_combine
from p2prec.gossip.codecs import get_codec
from p2prec.gossip.mixing import row_normalise, silence_senders
from p2prec.gossip.privacy import epsilon, noise_generator, privatize
from p2prec.gossip.robust import Aggregation, get_rule, robust_mix_named
from p2prec.gossip.stack import GossipStack
from p2prec.node.cli import build_node
from p2prec.node.cli import main as node_main
from p2prec.node.inbox import Inbox
from p2prec.node.place import place
from p2prec.node.runtime import Node
from p2prec.node.security import CurveSecurity, Keypair, NodeKeys, SecurityError, load_keypair, node_keys
from p2prec.node.transport import Transport, routing_id
from p2prec.launch import free_ports, prepare
from p2prec.topology import build, metropolis_hastings, write
from p2prec.topology import load as load_topology
from p2prec.topology.roles import CLIENT
from p2prec.wire import Message, MessageType, encode
from p2prec.wire.message import exchange_meta
from tests.node_support import make_backbone, node_config, with_addresses

QUIET_S = 1.0
"""How long a message that must not arrive is given to arrive anyway."""
TEMPLATE = {"w": np.zeros(4, dtype=np.float32)}


def path_of_three() -> nx.Graph:
    """The path 0 - 1 - 2 of data nodes, each with a free 127.0.0.1 address."""
    graph = with_addresses(nx.path_graph(3))
    nx.set_node_attributes(graph, CLIENT, "role")
    return graph


@pytest.fixture()
def secured(tmp_path: Path) -> tuple[Config, nx.Graph]:
    """Keys made by ``p2prec keys generate`` and a secured config over :func:`path_of_three`."""
    assert p2prec_main(["keys", "generate", "--out", str(tmp_path / "keys"), "--count", "3"]) == 0
    graph = path_of_three()
    for node in graph.nodes:
        graph.nodes[node]["key"] = load_keypair(tmp_path / "keys" / f"node{node}.key_secret").public.decode()
    write(graph, tmp_path / "topology.json")
    cfg = load(None, ["security.enabled=true", f"security.key_dir={tmp_path / 'keys'}",
                      f"gossip.topology={tmp_path / 'topology.json'}", "node.linger_ms=0"])
    return cfg, graph


def test_secret_keys_on_disk_are_0600(secured: tuple[Config, nx.Graph]) -> None:
    folder = Path(secured[0].security.key_dir)
    for i in range(3):
        assert stat.S_IMODE((folder / f"node{i}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / f"node{i}.key").stat().st_mode) == 0o644


@asynccontextmanager
async def receiving(node: Node) -> AsyncIterator[Inbox]:
    """``node``'s transport and receive loop, filing into an inbox until the block ends."""
    inbox = Inbox(node.place.node, future_rounds=2)
    transport = node.open_transport()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(node.receive(transport, inbox)), loop.create_task(transport.watch())]
    try:
        yield inbox
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        transport.close()


@asynccontextmanager
async def node_zero(cfg: Config, graph: nx.Graph, tmp: Path) -> AsyncIterator[tuple[Node, Inbox]]:
    """Node 0, secured, receiving until the block ends."""
    node = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp / "node-0", node_keys(cfg.security, 0, graph))
    async with receiving(node) as inbox:
        yield node, inbox


def as_node_one(graph: nx.Graph, keypair: Keypair | None = None, server_key: bytes = b"") -> Transport:
    """A transport presenting node 1's routing id, secured with ``keypair`` (plaintext if ``None``)."""
    keys = NodeKeys(keypair, {0: server_key}) if keypair is not None else None
    return Transport(1, f"tcp://127.0.0.1:{free_ports(1)[0]}", {0: graph.nodes[0]["address"]}, hwm=8, linger_ms=0,
                     max_frame_bytes=1 << 20, keys=keys)


async def hello_arrives(graph: nx.Graph, inbox: Inbox, keypair: Keypair | None, server_key: bytes) -> bool:
    """Whether node 0 files a hello sent as node 1 with ``keypair`` within :data:`QUIET_S`."""
    sender = as_node_one(graph, keypair, server_key)
    try:
        assert await sender.send(0, encode(Message(MessageType.HELLO, 1, 0, "none", {}, {}))) > 0
        missing = await inbox.wait_present([1], asyncio.get_running_loop().time() + QUIET_S)
    finally:
        sender.close()
    return not missing


def _keypair(cfg: Config, node: int) -> Keypair:
    return load_keypair(Path(cfg.security.key_dir) / f"node{node}.key_secret")


async def test_a_node_with_an_unknown_key_cannot_deliver(secured: tuple[Config, nx.Graph], tmp_path: Path) -> None:
    cfg, graph = secured
    threads = threading.active_count()
    stranger = Keypair(*zmq.curve_keypair())  # listed nowhere
    async with node_zero(cfg, graph, tmp_path) as (node, inbox):
        server_key = node.keys.keypair.public
        assert not await hello_arrives(graph, inbox, stranger, server_key)
        # Refused in the handshake, and logged as such: nothing reached the validator.
        assert set(node.rejections.total) == {("an unknown connection", "a handshake with a key not on the allow-list")}
        assert await hello_arrives(graph, inbox, _keypair(cfg, 1), server_key)
    assert threading.active_count() == threads


async def test_a_listed_key_that_is_not_a_neighbour_is_refused(secured: tuple[Config, nx.Graph],
                                                               tmp_path: Path) -> None:
    """On the path 0 - 1 - 2, node 2's key is in the topology but node 2 is not node 0's
    neighbour: only neighbours are on a node's allow-list."""
    cfg, graph = secured
    async with node_zero(cfg, graph, tmp_path) as (node, inbox):
        assert not await hello_arrives(graph, inbox, _keypair(cfg, 2), node.keys.keypair.public)
        assert set(node.rejections.total) == {("node 2", "a handshake from a listed node that is not a neighbour")}


async def test_a_plaintext_peer_is_refused_by_a_secured_node(secured: tuple[Config, nx.Graph], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cfg, graph = secured
    threads = threading.active_count()
    async with node_zero(cfg, graph, tmp_path) as (node, inbox):
        assert not await hello_arrives(graph, inbox, None, node.keys.keypair.public)
        await asyncio.sleep(0.2)
        # Logged as the mismatch it is (whichever side notices the other's mechanism first).
        assert {reason for _, reason in node.rejections.total} <= {"a plaintext handshake", "a broken-off handshake"}
        assert len(node.rejections) >= 1 and "security.enabled differs" in caplog.text
        assert await hello_arrives(graph, inbox, _keypair(cfg, 1), node.keys.keypair.public)
    assert threading.active_count() == threads


def _secured_triangle(tmp_path: Path):  # noqa: ANN202 - (networkx.Graph, Config)
    """The triangle 0 - 1 - 2 with a CurveZMQ key per node in the topology, and a secured config."""
    assert p2prec_main(["keys", "generate", "--out", str(tmp_path / "keys"), "--count", "3"]) == 0
    graph = with_addresses(nx.complete_graph(3))
    nx.set_node_attributes(graph, CLIENT, "role")
    for n in graph.nodes:
        graph.nodes[n]["key"] = load_keypair(tmp_path / "keys" / f"node{n}.key_secret").public.decode()
    return graph, load(None, ["security.enabled=true", f"security.key_dir={tmp_path / 'keys'}", "node.linger_ms=0"])


async def test_a_neighbours_key_cannot_claim_another_nodes_identity(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """On the triangle 0 - 1 - 2, node 2's key is on node 0's allow-list, so its connection is
    admitted; but it claims to be node 1 (header), which only the authenticated key exposes."""
    graph, cfg = _secured_triangle(tmp_path)
    async with node_zero(cfg, graph, tmp_path) as (node, inbox):
        assert not await hello_arrives(graph, inbox, _keypair(cfg, 2), node.keys.keypair.public)
        assert set(node.rejections.total) == {("node 2", "a sender id that is not its key's")}
    assert "header says node 1, the key is node 2's" in caplog.text


async def test_a_plaintext_neighbour_cannot_claim_another_nodes_identity(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Without security, on the triangle 0 - 1 - 2, node 2 connects under its own routing id
    but its header claims node 1: the routing id is the only identity there is, so the message
    is refused and node 1 is not marked present; node 1 itself still gets through."""
    graph = with_addresses(nx.complete_graph(3))
    nx.set_node_attributes(graph, CLIENT, "role")
    cfg = load(None, ["node.linger_ms=0"])
    node = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0", None)
    async with receiving(node) as inbox:
        two = Transport(2, f"tcp://127.0.0.1:{free_ports(1)[0]}", {0: graph.nodes[0]["address"]}, hwm=8,
                        linger_ms=0, max_frame_bytes=1 << 20)
        try:
            assert await two.send(0, encode(Message(MessageType.HELLO, 1, 0, "none", {}, {}))) > 0
            assert await inbox.wait_present([1], asyncio.get_running_loop().time() + QUIET_S) == {1}
        finally:
            two.close()
        assert set(node.rejections.total) == {("node 2", "a sender id that is not its connection's")}
        assert await hello_arrives(graph, inbox, None, b"")
    assert "header says node 1" in caplog.text


async def test_a_restarted_node_whose_neighbours_are_gone_says_so(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A node resuming after round 7 whose neighbours never answer (they finished the run and
    left) says what it is about to do, instead of starting rounds alone in silence."""
    graph = path_of_three()
    cfg = load(None, ["node.linger_ms=0", "node.start_timeout_s=0.5"])
    node = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0", None)
    node.progress.round = 7
    transport = node.open_transport()
    try:
        await asyncio.wait_for(node._greet(transport, Inbox(0, future_rounds=2)), 10)
    finally:
        transport.close()
    assert "no neighbour answered" in caplog.text and "resumes after round 7" in caplog.text
    assert f"runs rounds 8-{cfg.run.rounds} alone" in caplog.text


async def test_a_neighbour_cannot_squat_another_neighbours_connection(tmp_path: Path) -> None:
    """On the triangle 0 - 1 - 2, node 1 (a neighbour, its key admitted) connects to node 0
    first under the routing id a plaintext node 2 would use. With security each connection
    presents a fresh random routing id, so the real node 2 still gets through (a duplicate
    routing id would be ignored by ZeroMQ for as long as the squatter stays)."""
    graph, cfg = _secured_triangle(tmp_path)
    ctx = zmq.Context()
    async with node_zero(cfg, graph, tmp_path) as (node, inbox):
        squatter = ctx.socket(zmq.DEALER)
        squatter.setsockopt(zmq.LINGER, 0)
        squatter.setsockopt(zmq.ROUTING_ID, routing_id(2))
        CurveSecurity(ctx, _keypair(cfg, 1), []).dial(squatter, node.keys.keypair.public)
        squatter.connect(graph.nodes[0]["address"])
        squatter.send_multipart(encode(Message(MessageType.HELLO, 1, 0, "none", {}, {})))
        assert await inbox.wait_present([2], asyncio.get_running_loop().time() + QUIET_S) == {2}
        two = Transport(2, f"tcp://127.0.0.1:{free_ports(1)[0]}", {0: graph.nodes[0]["address"]}, hwm=8,
                        linger_ms=0, max_frame_bytes=1 << 20, keys=node_keys(cfg.security, 2, graph))
        try:
            assert await two.send(0, encode(Message(MessageType.HELLO, 2, 0, "none", {}, {}))) > 0
            assert not await inbox.wait_present([2], asyncio.get_running_loop().time() + 5)
        finally:
            two.close()
            squatter.close(0)
    ctx.term()


def test_keys_and_security_go_together(secured: tuple[Config, nx.Graph], tmp_path: Path) -> None:
    cfg, graph = secured
    with pytest.raises(SecurityError, match="security.enabled is True but keys were not given"):
        Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "n", None)
    with pytest.raises(SecurityError, match="security.enabled is False but keys were given"):
        Node(load(None, []), place(graph, 0, 3), None, TEMPLATE, tmp_path / "n", node_keys(cfg.security, 0, graph))


@pytest.mark.parametrize("case,needle", [
    ("no keys", "node0.key_secret does not exist"),
    ("no key attributes", "topology node 0 has no 'key' attribute"),
])
def test_a_secured_node_without_keys_is_one_line_and_status_2(tmp_path: Path, synth_dir: Path, case: str,
                                                               needle: str, capsys: pytest.CaptureFixture) -> None:
    config = node_config(tmp_path, synth_dir, build("ring", 3), ["sim.nodes=3"])
    keys = tmp_path / "keys"
    if case == "no key attributes":
        assert p2prec_main(["keys", "generate", "--out", str(keys), "--count", "3"]) == 0
        capsys.readouterr()
    args = ["--config", str(config), "--backbone", str(tmp_path / "never-read"), "--id", "0",
            "--set", "security.enabled=true", "--set", f"security.key_dir={keys}"]
    assert node_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_the_launcher_gives_secured_nodes_their_keys(tmp_path: Path, synth_data, tiny_cfg) -> None:  # noqa: ANN001
    tiny_cfg.security.enabled, tiny_cfg.security.key_dir = True, str(tmp_path / "elsewhere")
    tiny_cfg.gossip.topology = "ring"
    ids = prepare(tiny_cfg, synth_data, tmp_path / "run", 3)
    cfg = load(tmp_path / "run" / "config.toml")
    assert Path(cfg.security.key_dir) == (tmp_path / "run" / "keys").resolve()
    graph = load_topology(cfg.gossip.topology)
    for i in ids:
        assert node_keys(cfg.security, i, graph).keypair == _keypair(cfg, i)
    before = (tmp_path / "run" / "keys" / "node1.key_secret").read_bytes()
    assert prepare(load(tmp_path / "run" / "config.toml"), synth_data, tmp_path / "run", 3) == ids
    assert (tmp_path / "run" / "keys" / "node1.key_secret").read_bytes() == before


def test_the_launcher_needs_no_more_than_security_enabled(tmp_path: Path, synth_data, tiny_cfg) -> None:  # noqa: ANN001
    """``p2prec-sim --processes N --set security.enabled=true``: the launcher makes the keys."""
    cfg = load(None, [f"data.dir={tiny_cfg.data.dir}", "data.name=synthetic", "security.enabled=true",
                      "gossip.topology=ring"])
    ids = prepare(cfg, synth_data, tmp_path / "run", 3)
    run = load(tmp_path / "run" / "config.toml")
    graph = load_topology(run.gossip.topology)
    assert all(node_keys(run.security, i, graph).keypair == _keypair(run, i) for i in ids)


@pytest.mark.parametrize("name", ["int8", "int4"])
async def test_a_node_decodes_its_codec_and_rejects_any_other(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              name: str) -> None:
    cfg, graph = load(None, [f"gossip.codec={name}", "node.linger_ms=0"]), path_of_three()
    node = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0")
    codec = get_codec(name)
    x = {"w": np.array([0.5, -1.0, 0.3, 2.0], dtype=np.float32)}
    async with receiving(node) as inbox:
        sender = as_node_one(graph)
        try:
            for label, payload in (("none", x), ("fp16", codec.encode(x)), (name, codec.encode(x))):
                await sender.send(0, encode(Message(MessageType.GOSSIP, 1, 1, label, payload, {})))
            got = await inbox.collect(1, MessageType.GOSSIP, [1], asyncio.get_running_loop().time() + 5)
        finally:
            sender.close()
    assert len(node.rejections) == 2  # float32 fails the codec's wire spec; its payload named fp16 fails the codec check
    assert f"refused another codec from node 1 (codec 'fp16', this network's gossip.codec is '{name}')" in caplog.text
    expected = codec.decode(codec.encode(x), {"w": (4,)})["w"].numpy()
    np.testing.assert_array_equal(got[1].tensors["w"], expected)
    assert not np.array_equal(expected, x["w"])


async def test_a_node_files_each_exchange_apart_and_rejects_one_beyond_its_config(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``gossip.exchanges = 2``: a round's two messages from one peer are both held, each for its
    own exchange, and a message naming exchange 2 is rejected (the network has 0 and 1)."""
    cfg, graph = load(None, ["gossip.exchanges=2", "node.linger_ms=0"]), path_of_three()
    node = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0")
    states = [{"w": np.full(4, value, dtype=np.float32)} for value in (1.0, 2.0, 3.0)]
    async with receiving(node) as inbox:
        sender = as_node_one(graph)
        try:
            for exchange, state in enumerate(states):
                await sender.send(0, encode(Message(MessageType.GOSSIP, 1, 1, "none", state, exchange_meta(exchange))))
            deadline = asyncio.get_running_loop().time() + 5
            got = [await inbox.collect(1, MessageType.GOSSIP, [1], deadline, exchange) for exchange in (0, 1)]
        finally:
            sender.close()
    assert [float(g[1].tensors["w"][0]) for g in got] == [1.0, 2.0]
    assert len(node.rejections) == 1 and "refused an exchange beyond gossip.exchanges from node 1 (exchange 2, gossip.exchanges = 2)" in caplog.text


def test_the_error_feedback_residual_survives_a_restart(tmp_path: Path) -> None:
    cfg, graph = load(None, ["gossip.codec=topk", "gossip.topk_fraction=0.5"]), path_of_three()
    first = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0")
    first.feedback.residual = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}
    first.resume()  # no checkpoint yet: writes round 0's, residual included
    again = Node(cfg, place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0")
    again.resume()
    assert torch.equal(again.feedback.residual["w"], first.feedback.residual["w"])
    assert Node(load(None, []), place(graph, 0, 3), None, TEMPLATE, tmp_path / "node-0").feedback is None


def test_a_compressing_codec_needs_flat_gossip(tmp_path: Path) -> None:
    graph = with_addresses(build("edge-hierarchy:m=2", 6, seed=0))
    with pytest.raises(ConfigError, match="gossip.codec: real nodes of an edge hierarchy support only 'none'"):
        Node(load(None, ["gossip.codec=int8"]), place(graph, 0, 6), None, TEMPLATE, tmp_path / "n")


@pytest.mark.parametrize(("rule", "tracker_rule"), [("mean", "same"), ("median", "same"), ("trimmed-mean", "same"),
                                                    ("clipped", "same"), ("clipped-adaptive", "same"),
                                                    ("median", "clipped-adaptive"), ("mean", "trimmed-mean")])
def test_a_nodes_robust_aggregate_is_its_row_of_the_simulators(rule: str, tracker_rule: str) -> None:
    """Each node's :func:`robust_combine` over what it heard (its own true state apart) equals
    its row of :func:`robust_mix_named` on the renormalised, silenced matrix the simulator uses,
    with the trackers under a rule of their own too."""
    w = metropolis_hastings(build("small-world:k=4,p=0.3", 12, seed=1))
    gen = torch.Generator().manual_seed(0)
    sent = {"a": torch.randn(12, 3, 2, generator=gen), "b": torch.randn(12, 5, generator=gen),
            "track.a": torch.randn(12, 3, 2, generator=gen), "track.b": torch.randn(12, 5, generator=gen)}
    own = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sent.items()}
    aggregation = Aggregation(get_rule(rule, trim=0.2, tau=0.5),
                              None if tracker_rule == "same" else get_rule(tracker_rule, trim=0.2, tau=0.5))
    silent = np.random.default_rng(2).random(12) < 0.3
    whole = robust_mix_named(aggregation, row_normalise(silence_senders(w, silent)), sent, own, list(sent))
    for i in range(12):
        heard = [int(j) for j in w[i].indices if j != i and not silent[j]]
        got = robust_combine(aggregation, heard_row(w, i, heard), i, {k: v[i].numpy() for k, v in own.items()},
                             {j: {k: v[j].numpy() for k, v in sent.items()} for j in heard})
        for k in sent:
            assert torch.allclose(got[k], whole[k][i], atol=1e-6), (rule, tracker_rule, i, k)


def test_a_robust_rule_needs_flat_gossip(tmp_path: Path) -> None:
    graph = with_addresses(build("edge-hierarchy:m=2", 6, seed=0))
    with pytest.raises(ConfigError, match="robust.rule: real nodes of an edge hierarchy support only 'mean'"):
        Node(load(None, ["robust.rule=median"]), place(graph, 0, 6), None, TEMPLATE, tmp_path / "n")


def test_privacy_needs_flat_gossip(tmp_path: Path) -> None:
    """A client's sample count would go out in the clear, outside the accountant: refused."""
    graph = with_addresses(build("edge-hierarchy:m=2", 6, seed=0))
    with pytest.raises(ConfigError, match="privacy.enabled: real nodes of an edge hierarchy"):
        Node(load(None, ["privacy.enabled=true"]), place(graph, 0, 6), None, TEMPLATE, tmp_path / "n")


def test_a_private_node_resumes_its_release_count(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                  tiny_cfg) -> None:
    """Epsilon after a restart counts the rounds before it: every round that trained released."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    config = node_config(tmp_path, synth_dir, build("ring", 3), ["sim.nodes=3", "run.rounds=5", "run.train_rounds=2",
                                                                 "privacy.enabled=true"])
    cfg = load(config)
    first = build_node(cfg, 1, str(backbone))
    first.resume()
    assert first.stack.privacy.releases == 0 and first.stack.privacy.ids == [1]
    first.progress.round = 3
    first._save()
    again = build_node(cfg, 1, str(backbone))
    again.resume()
    assert again.stack.privacy.releases == 2 and again.stack.epsilon() == pytest.approx(epsilon(1.0, 2, 1e-5))


def test_a_nodes_release_is_its_row_of_the_simulators() -> None:
    cfg = load(None, ["privacy.enabled=true", "privacy.clip=0.5", "privacy.noise_multiplier=1.5", "run.rounds=4"])
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(5, 3, 2, generator=gen), "b": torch.randn(5, 7, generator=gen)}
    trained = {k: v + torch.randn(v.shape, generator=gen) for k, v in start.items()}
    everyone = GossipStack.from_config(cfg, start, range(5)).privacy
    stacked = {k: v.clone() for k, v in trained.items()}
    active = np.array([True, False, True, True, True])
    everyone.release(stacked, 3, active)
    assert torch.equal(stacked["a"][1], trained["a"][1])  # a node that is down releases nothing
    for i in (0, 3):
        alone = GossipStack.from_config(cfg, {k: v[i:i + 1] for k, v in start.items()}, [i]).privacy
        mine = {k: v[i:i + 1].clone() for k, v in trained.items()}
        alone.release(mine, 3, np.ones(1, dtype=bool))
        for k in mine:
            assert torch.allclose(mine[k][0], stacked[k][i], atol=1e-6), (i, k)


@pytest.mark.parametrize("seeded", [False, True])
def test_a_neighbour_cannot_subtract_a_real_nodes_noise(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                        tiny_cfg, seeded: bool) -> None:
    """The attack on local DP: a neighbour holds the shared config (seeds included), the
    seeded initial state (round 1's reference, which it builds itself) and the node's message.
    It regenerates the noise stream the config names and subtracts it. Against a real node's
    default (noise from the operating system) what it recovers is off by the noise itself,
    about ``sigma * C * sqrt(dim)``; only with ``privacy.seeded_noise`` does it read the
    clipped update exactly, which is why that is never a real node's default."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    sigma, clip = 0.5, 0.05
    config = node_config(tmp_path, synth_dir, build("ring", 3), [
        "sim.nodes=3", "run.rounds=2", "privacy.enabled=true", f"privacy.clip={clip}",
        f"privacy.noise_multiplier={sigma}", f"privacy.seeded_noise={str(seeded).lower()}"])
    cfg = load(config)
    victim = build_node(cfg, 1, str(backbone))
    victim.resume(fresh=True)
    assert victim.stack.privacy.secret is not seeded
    learner = victim.learner
    victim.stack.start_round(learner.pop.shared())
    learner.train(1)
    trained = {k: v.clone() for k, v in learner.pop.shared().items()}
    victim.stack.release(learner.pop.shared(), 1, np.ones(1, dtype=bool))
    message = {k: v.clone() for k, v in learner.pop.shared().items()}   # what goes on the wire

    # The neighbour: the same config, the seeded initial state (built, not read from the
    # victim), and the noise stream the config names for (privacy.seed, round 1, node 1).
    reference = build_node(cfg, 1, str(backbone)).learner.pop.shared()
    noised_update = {k: message[k] - reference[k] for k in message}
    regenerated = privatize({k: torch.zeros_like(v) for k, v in noised_update.items()}, clip, sigma,
                            [noise_generator(cfg.run.seed, 1, 1)], stacked=True)
    guess = {k: noised_update[k] - regenerated[k] for k in noised_update}
    truth = {k: trained[k] - reference[k] for k in trained}
    norm = float(sum((v.pow(2).sum() for v in truth.values())).sqrt())
    true_clipped = {k: v * min(1.0, clip / norm) for k, v in truth.items()}
    error = float(sum(((guess[k] - true_clipped[k]).pow(2).sum() for k in guess)).sqrt())
    dim = sum(v.numel() for v in truth.values())
    noise = sigma * clip * dim ** 0.5
    if seeded:
        assert error < 1e-4 * noise
    else:
        assert 0.5 * noise < error < 2.0 * noise, (error, noise)
