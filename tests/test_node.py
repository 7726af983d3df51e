"""The node's parts without a network: its mixing row, checkpoints, inbox rules, place, and CLI errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from p2prec.config import GossipConfig, SimConfig
from p2prec.gossip.aggregate import aggregator_mixing, combine, count_weighted_row, heard_row
from p2prec.gossip.mixing import count_weighted_rows, mix, row_normalise, row_normalise_rect, silence_senders
from p2prec.node.cli import main
from p2prec.node.inbox import Abandoned, Inbox
from p2prec.node.place import FLAT, place
from p2prec.run import checkpoint
from p2prec.sim.faults import FaultPlan
from p2prec.sim.plan import MixingPlan
from p2prec.topology import TopologyError, aggregators, build, metropolis_hastings
from p2prec.topology.roles import AGGREGATOR, AGGREGATOR_ONLY, CLIENT
from p2prec.wire import Message, MessageType
from p2prec.wire.message import exchange_meta
from tests.node_support import make_backbone, node_config


def test_a_nodes_row_is_the_simulators_row_for_every_pattern_of_silence() -> None:
    w = metropolis_hastings(build("small-world:k=4,p=0.3", 30, seed=3))
    rng = np.random.default_rng(0)
    for _ in range(20):
        silent = rng.random(30) < 0.4
        whole = row_normalise(silence_senders(w, silent))
        for i in range(30):
            heard = [j for j in w[i].indices if j != i and not silent[j]]
            assert np.allclose(heard_row(w, i, heard).toarray(), whole[i].toarray(), atol=1e-12)


def test_an_aggregators_up_row_is_the_simulators_masked_row() -> None:
    counts = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    members = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    up = count_weighted_rows(members, counts, 6)
    heard = np.array([True, False, True, True, True, False])
    masked = up.multiply(sp.csr_matrix(heard.astype(float))).tocsr()
    whole = row_normalise_rect(masked)
    assert np.allclose(count_weighted_row([0, 2], counts[[0, 2]], 6).toarray(), whole[0].toarray())
    assert np.allclose(count_weighted_row([3, 4], counts[[3, 4]], 6).toarray(), whole[1].toarray())


def test_combine_is_the_product_with_the_row() -> None:
    w = row_normalise(metropolis_hastings(build("ring", 6)))
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(6, 3, 2, generator=g), "b": torch.randn(6, 4, generator=g)}
    expected = mix(w, x)
    row = heard_row(w, 2, [1, 3])
    got = combine(row, {j: {k: v[j].numpy() for k, v in x.items()} for j in (1, 2, 3)})
    for k in x:
        assert torch.allclose(got[k], expected[k][2], atol=1e-6)


def test_checkpoints_round_trip_and_replace_atomically(tmp_path: Path) -> None:
    path = tmp_path / "node-3" / checkpoint.FILE_NAME
    tensors = {"param/x": torch.randn(1, 4, 2), "opt/t": torch.ones(1), "rng/torch": torch.get_rng_state()}
    checkpoint.save(path, checkpoint.Checkpoint(3, 5, tensors, {"bytes_sent_total": 12}))
    checkpoint.save(path, checkpoint.Checkpoint(3, 6, tensors, {"bytes_sent_total": 24}))
    back = checkpoint.load(path, 3)
    assert (back.round, back.info) == (6, {"bytes_sent_total": 24})
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
    assert [p.name for p in path.parent.iterdir()] == [checkpoint.FILE_NAME]
    with pytest.raises(checkpoint.CheckpointError, match="belongs to node 3"):
        checkpoint.load(path, 4)


WRITER = """
import sys, torch
from pathlib import Path
from p2prec.run import checkpoint
path = Path(sys.argv[1])
big = torch.arange(8 << 20, dtype=torch.float32)
for k in range(1, 10**6):
    checkpoint.save(path, checkpoint.Checkpoint(3, k, {"param/x": big + k}, {}))
    print(k, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that writes 32 MB checkpoints back to back, at random moments, many
    times: the file is always a whole checkpoint (the last one written, or the one being
    replaced), never a torn one. A plain write in place fails this within a few kills."""
    import random
    import subprocess
    import sys
    import time

    path = tmp_path / "node-3" / checkpoint.FILE_NAME
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rounds_seen = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline()   # at least one whole checkpoint exists
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.kill()
            proc.wait()
        back = checkpoint.load(path, 3)
        assert torch.equal(back.tensors["param/x"], torch.arange(8 << 20, dtype=torch.float32) + back.round)
        rounds_seen.append(back.round)
    assert not [p for p in path.parent.iterdir() if p.name != checkpoint.FILE_NAME and not p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"\xff" * 64,
                                    lambda b: b[:-1] + bytes([b[-1] ^ 1])])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path: Path, damage) -> None:  # noqa: ANN001
    path = tmp_path / checkpoint.FILE_NAME
    checkpoint.save(path, checkpoint.Checkpoint(0, 1, {"param/x": torch.zeros(2)}))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(path, 0)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _msg(sender: int, rnd: int, kind: MessageType = MessageType.GOSSIP) -> Message:
    return Message(kind, sender, rnd, "none", {}, {})


async def test_inbox_does_not_wait_for_an_exchange_a_peer_has_already_passed() -> None:
    """Messages of one peer arrive in order, so once its exchange 1 is in, its exchange 0 of
    the same round came or never will."""
    inbox = Inbox(0, future_rounds=1)
    inbox.offer(Message(MessageType.GOSSIP, 1, 1, "none", {}, exchange_meta(1)))
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await inbox.collect(1, MessageType.GOSSIP, [1], start + 30, exchange=0) == {}
    assert loop.time() - start < 5
    assert list(await inbox.collect(1, MessageType.GOSSIP, [1], start + 30, exchange=1)) == [1]


async def test_inbox_drops_late_buffers_future_up_to_its_bound_and_dedupes() -> None:
    inbox = Inbox(0, future_rounds=2, first_round=3)
    assert not inbox.offer(_msg(1, 2))
    assert inbox.offer(_msg(1, 3)) and inbox.offer(_msg(1, 5))
    assert not inbox.offer(_msg(1, 6))
    assert not inbox.offer(_msg(1, 3))
    loop = asyncio.get_running_loop()
    got = await inbox.collect(3, MessageType.GOSSIP, [1], loop.time() + 5)
    assert list(got) == [1]
    inbox.advance(5)
    got = await inbox.collect(5, MessageType.GOSSIP, [1, 2], loop.time() + 0.05)
    assert list(got) == [1]


async def test_inbox_stops_waiting_for_a_peer_already_heard_at_a_later_round_in_its_window() -> None:
    inbox = Inbox(0, future_rounds=2)
    assert inbox.offer(_msg(2, 3))
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await inbox.collect(1, MessageType.GOSSIP, [2], start + 30)
    assert got == {} and loop.time() - start < 1


async def test_a_message_outside_the_window_changes_no_state() -> None:
    """A forged far-future round must not make the node stop waiting for its claimed sender,
    nor a past one mark an absent peer present."""
    inbox = Inbox(0, future_rounds=1, first_round=2)
    assert not inbox.offer(_msg(2, 9)) and inbox.refusal == "round beyond the window"
    assert not inbox.offer(_msg(2, 1)) and inbox.refusal == "past round"
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, inbox.offer, _msg(2, 2))
    got = await inbox.collect(2, MessageType.GOSSIP, [2], loop.time() + 10)
    assert list(got) == [2]
    inbox.advance(3)
    assert await inbox.collect(3, MessageType.GOSSIP, [1], loop.time() + 0.05) == {}   # node 1 is now absent
    inbox.advance(4)
    assert not inbox.offer(_msg(1, 99)) and not inbox.offer(_msg(1, 3))
    start = loop.time()
    loop.call_later(0.3, inbox.offer, _msg(1, 4))
    assert await inbox.collect(4, MessageType.GOSSIP, [1], start + 10) == {}    # still absent: not waited for
    assert loop.time() - start < 0.25


async def test_a_peer_that_missed_a_deadline_is_not_waited_for_until_heard_again() -> None:
    inbox = Inbox(0, future_rounds=1)
    loop = asyncio.get_running_loop()
    assert await inbox.collect(1, MessageType.GOSSIP, [1, 2], loop.time() + 0.05) == {}
    inbox.advance(2)
    start = loop.time()
    assert await inbox.collect(2, MessageType.GOSSIP, [1, 2], start + 30) == {}
    assert loop.time() - start < 1
    inbox.offer(_msg(2, 0, MessageType.HELLO))
    inbox.advance(3)
    loop.call_later(0.05, inbox.offer, _msg(2, 3))
    got = await inbox.collect(3, MessageType.GOSSIP, [1, 2], loop.time() + 30)
    assert list(got) == [2]


async def test_inbox_wakes_on_arrival_and_raises_when_closed() -> None:
    inbox = Inbox(0, future_rounds=1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, inbox.offer, _msg(1, 1))
    got = await inbox.collect(1, MessageType.GOSSIP, [1], loop.time() + 30)
    assert list(got) == [1]
    loop.call_later(0.05, inbox.close)
    with pytest.raises(Abandoned):
        await inbox.collect(2, MessageType.GOSSIP, [1], loop.time() + 30)


def _addressed(graph):  # noqa: ANN001, ANN202
    for v in graph.nodes:
        graph.nodes[v]["address"] = f"tcp://127.0.0.1:{7000 + v}"
    return graph


def test_place_gives_roles_peers_and_the_mixing_row() -> None:
    ring = place(_addressed(build("ring", 5)), 0, 5)
    assert ring.kind == FLAT and sorted(ring.peers) == [1, 4] and ring.mixing_row == 0
    graph = _addressed(build("edge-hierarchy:m=2", 6, seed=0))
    aggs = aggregators(graph)
    hub = place(graph, aggs[0], 6)
    assert hub.kind == AGGREGATOR_ONLY and not hub.has_data and hub.agg_peers == (aggs[1],)
    assert all(graph.nodes[m]["aggregator"] == aggs[0] for m in hub.members)
    assert np.allclose(hub.mixing.toarray(), aggregator_mixing(graph, aggs).toarray())
    client = place(graph, hub.members[0], 6)
    assert client.kind == CLIENT and list(client.peers) == [aggs[0]]
    trained = _addressed(build("edge-hierarchy:m=2,train=true", 6, seed=0))
    assert place(trained, aggregators(trained)[0], 6).kind == AGGREGATOR
    with pytest.raises(TopologyError, match="not in the topology"):
        place(_addressed(build("ring", 5)), 9, 5)


def test_every_node_draws_the_simulators_matching_for_each_round() -> None:
    """``gossip.mixing=matching``: each node computes round t's matching from the shared seed
    alone; all nodes' partner lists agree with each other and with the simulator's plan."""
    graph = _addressed(build("small-world:k=4", 12, seed=1))
    cfg = GossipConfig(topology="small-world", mixing="matching")
    places = [place(graph, v, 12, cfg, seed=5) for v in range(12)]
    plan = MixingPlan(graph, 12, np.ones(12), cfg, 5)
    quiet = FaultPlan(SimConfig(), 12, 0)
    draws = []
    for rnd in (1, 2, 3):
        w = plan.round(rnd, quiet.round(rnd)).a + sp.diags(plan.round(rnd, quiet.round(rnd)).d)
        for v, here in enumerate(places):
            row = here.rounds.round(rnd)[v]
            assert np.allclose(row.toarray(), w[[v]].toarray())
            partners = [j for j in row.indices if j != v]
            assert len(partners) <= 1 and all(j in here.peers for j in partners)
            assert all(v in places[j].rounds.round(rnd)[j].indices for j in partners)
        draws.append(w.toarray())
    assert not np.allclose(draws[0], draws[1])


@pytest.fixture()
def node_files(tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> tuple[Path, Path]:  # noqa: ANN001
    config = node_config(tmp_path, synth_dir, build("ring", 3), ["sim.nodes=3", "run.rounds=2"])
    return config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb")


@pytest.mark.parametrize("case,needle", [
    ("config", "sim.bogus"),
    ("topology", "does not exist"),
    ("id", "node id 7 is not in the topology"),
    ("checkpoint", "is unreadable"),
    ("peers", "gossip.mixing: real nodes support 'metropolis' and 'matching' so far, got 'peers'"),
])
def test_node_cli_bad_input_is_one_line_and_status_2(node_files: tuple[Path, Path], case: str, needle: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    config, backbone = node_files
    args = ["--config", str(config), "--backbone", str(backbone), "--id", "0"]
    if case == "config":
        args += ["--set", "sim.bogus=1"]
    elif case == "topology":
        args += ["--set", f"gossip.topology={config.parent / 'missing.json'}"]
    elif case == "id":
        args[-1] = "7"
    elif case == "peers":
        args += ["--set", "gossip.mixing=peers"]
    else:
        bad = config.parent / "nodes" / "node-0" / checkpoint.FILE_NAME
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"\x00" * 100)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


async def test_a_peer_resuming_behind_or_finished_is_not_waited_for() -> None:
    """A hello naming a round behind this node's (a neighbour restarted from an older
    checkpoint) and a bye (a neighbour finished the run) each cost no deadline; the
    restarted one is waited for again once it catches up into the window."""
    inbox = Inbox(0, future_rounds=1, first_round=5)
    loop = asyncio.get_running_loop()
    inbox.offer(_msg(1, 3, MessageType.HELLO))
    inbox.offer(_msg(2, 4, MessageType.BYE))
    assert inbox.finished == {2: 4}
    start = loop.time()
    assert await inbox.collect(5, MessageType.GOSSIP, [1, 2], start + 30) == {}
    assert loop.time() - start < 1
    inbox.advance(6)
    assert inbox.offer(_msg(1, 6))
    assert list(await inbox.collect(6, MessageType.GOSSIP, [1, 2], loop.time() + 30)) == [1]


def test_relative_paths_in_a_node_config_are_read_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2prec.config import load
    from p2prec.node.cli import resolve_paths

    folder = tmp_path / "device"
    folder.mkdir()
    (folder / "topology.json").write_text("{}")
    (folder / "config.toml").write_text('[gossip]\ntopology = "topology.json"\n[node]\ndir = "state"\n'
                                        '[data]\ndir = "../data"\n[security]\nkey_dir = "keys"\n')
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load(folder / "config.toml", ["security.secret_key=mine.key_secret"]),
                        "device/config.toml")
    assert cfg.gossip.topology == str(folder / "topology.json")
    assert cfg.node.dir == str(folder / "state") and cfg.security.key_dir == str(folder / "keys")
    assert cfg.data.dir == str(folder / "../data")
    assert cfg.security.secret_key == "mine.key_secret"   # given with --set: the shell's folder
    named = resolve_paths(load(None, ["gossip.topology=ring"]), None)
    assert named.gossip.topology == "ring"
