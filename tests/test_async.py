"""Asynchronous gossip: the rule's bookkeeping, the simulated clock, the event-driven simulator,
and real async nodes (the same math as the simulator, no barrier, crash, hostile input)."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import zmq

from p2prec.cli import main as p2prec_main
from p2prec.config import ConfigError, load
from p2prec.gossip.async_rule import Freshest, check_async, mixing_row
from p2prec.model.store import load_backbone
from p2prec.node.security import load_keypair
from p2prec.run import checkpoint
from p2prec.sim.clock import SLOW_FACTOR, NodeClock
from p2prec.sim.events import AsyncSimulation, Update
from p2prec.topology import build, metropolis_hastings
from p2prec.topology import load as load_topology
from p2prec.wire import Message, MessageType, encode
from tests.conftest import TINY
from tests.node_support import Procs, make_backbone, node_config, node_params, rounds_done, shared_hash, wait_for
from tests.test_node_net import _hostile, _neighbour_socket

ASYNC = ["gossip.mode=async", "gossip.tracking=false"]


def _lines(folder: Path, node: int) -> list[dict]:
    """Node ``node``'s complete ``rounds.jsonl`` lines (one being appended is left out)."""
    return [json.loads(x) for x in (folder / f"node-{node}" / "rounds.jsonl").read_text().split("\n")[:-1]]


def test_a_held_state_is_mixed_for_max_staleness_updates_then_dropped() -> None:
    fresh: Freshest[str] = Freshest(max_staleness=2)
    fresh.arrive(3, 7, "a")
    assert {j: h.update for j, h in fresh.fresh().items()} == {3: 7}
    fresh.advance()
    assert list(fresh.fresh()) == [3]
    fresh.arrive(4, 1, "b")
    fresh.advance()
    assert list(fresh.fresh()) == [4]           # 3's state is two of this node's updates old
    fresh.arrive(4, 1, "c")                      # a restarted sender repeats an index: the latest arrival wins
    assert fresh.fresh()[4].item == "c"


def test_the_async_row_renormalises_over_the_fresh_neighbours() -> None:
    w = metropolis_hastings(build("ring", 5))
    row = mixing_row(w, 0, [1])
    assert set(row.indices) == {0, 1} and row.sum() == pytest.approx(1.0)
    assert row[0, 0] == pytest.approx(w[0, 0] / (w[0, 0] + w[0, 1]))
    alone = mixing_row(w, 0, [])
    assert alone[0, 0] == 1.0 and alone.nnz == 1


def test_async_mode_refuses_what_it_does_not_implement(tiny_cfg) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="gossip.tracking"):
        check_async(load(None, TINY + ["gossip.mode=async"]))
    with pytest.raises(ConfigError, match="gossip.codec"):
        check_async(load(None, TINY + ASYNC + ["gossip.codec=int8"]))
    check_async(load(None, TINY + ASYNC))


def test_the_clock_is_seeded_and_slow_nodes_are_ten_times_slower() -> None:
    cfg = load(None, ["sim.slow=0.2", "sim.speed_sigma=0"]).sim
    graph = build("small-world", 50)
    a, b = NodeClock(cfg, graph, 50, 0), NodeClock(cfg, graph, 50, 0)
    assert np.array_equal(a.compute, b.compute) and (a.latency != b.latency).nnz == 0
    assert a.slow.sum() == 10 and np.allclose(a.compute[a.slow], SLOW_FACTOR) and np.allclose(a.compute[~a.slow], 1)
    senders = a.latency.tocoo().col
    assert (a.latency.tocoo().data <= 0.5 * a.compute[senders] + 1e-12).all()
    assert a.sync_round(2, 0) == pytest.approx(SLOW_FACTOR + 2 * a.max_latency)
    assert list(a.period(3.0)[a.slow][:1]) == [4] and (a.period(3.0)[~a.slow] == 1).all()


def _async_sim(cfg_sets: list[str], synth_dir: Path, synth_data, tiny_cfg, tmp: Path) -> AsyncSimulation:  # noqa: ANN001
    cfg = load(None, TINY + ASYNC + [f"data.dir={synth_dir}", "train.backbone_dropout=false"] + cfg_sets)
    backbone = load_backbone(make_backbone(synth_data, tiny_cfg, tmp), synth_data)
    from p2prec.run.data import select_nodes
    return AsyncSimulation(cfg, synth_data, backbone,
                           load_topology(cfg.gossip.topology, len(select_nodes(synth_data, cfg)), cfg.run.seed))


def test_the_event_driven_simulation_is_reproducible_and_fast_nodes_do_more(tmp_path: Path, synth_dir: Path,  # noqa: ANN001
                                                                           synth_data, tiny_cfg) -> None:
    sets = ["sim.nodes=16", "sim.slow=0.25", "run.rounds=6", "eval.every=3", "eval.protocols=sampled",
            "eval.select_protocol=sampled"]
    runs = [_async_sim(sets, synth_dir, synth_data, tiny_cfg, tmp_path / f"bb{i}") for i in range(2)]
    records = [sim.run(progress=False) for sim in runs]
    assert [r["sim_time"] for r in records[0]] == [3.0, 6.0]
    assert records[0][-1]["updates"] == records[1][-1]["updates"] > 0
    assert [r["val"] for r in records[0]] == [r["val"] for r in records[1]]
    sim = runs[0]
    assert sim.freshest[int(np.flatnonzero(sim.clock.slow)[0])].updates < \
        min(f.updates for i, f in enumerate(sim.freshest) if sim.clock.compute[i] < 1.5)


def test_real_async_nodes_compute_what_the_simulator_computes_on_their_schedule(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> None:
    """Four real async nodes run freely, under CurveZMQ; their logs name every neighbour version
    each update mixed. Replayed through the event-driven simulator, that schedule gives the same
    adapters. Each update's line counts the bytes of the messages that arrived for it."""
    rounds = 8
    assert p2prec_main(["keys", "generate", "--out", str(tmp_path / "keys"), "--count", "4"]) == 0
    graph = build("ring", 4)
    for i in graph.nodes:
        graph.nodes[i]["key"] = load_keypair(tmp_path / "keys" / f"node{i}.key_secret").public.decode()
    config = node_config(tmp_path, synth_dir, graph,
                         ["sim.nodes=4", f"run.rounds={rounds}", "eval.every=1000", "security.enabled=true",
                          f"security.key_dir={tmp_path / 'keys'}", *ASYNC])
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    procs = Procs(config, backbone)
    try:
        for i in range(4):
            procs.start(i)
        codes = procs.wait_all(240)
    finally:
        procs.close()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    folder = tmp_path / "nodes"
    assert all("(CurveZMQ)" in procs.log(i) for i in range(4))
    schedule = [Update(i, r["round"], {int(j): v for j, v in r["mixed"].items()})
                for i in range(4) for r in _lines(folder, i)]
    assert any(u.mixed for u in schedule)
    message = min(r["bytes_sent"] for i in range(4) for r in _lines(folder, i)) / 2  # 2 neighbours each
    for i in range(4):
        versions = {(j, v) for r in _lines(folder, i) for j, v in r["mixed"].items()}
        assert sum(r["bytes_received"] for r in _lines(folder, i)) >= len(versions) * message, i
    cfg = load(config)
    sim = AsyncSimulation(cfg, synth_data, load_backbone(backbone, synth_data), load_topology(cfg.gossip.topology),
                          keep=rounds + 1)
    sim.replay(schedule)
    for i in range(4):
        params = node_params(folder, i)
        for k, v in params.items():
            assert torch.allclose(v[0], sim.pop.params[k][i], atol=1e-5), (i, k)


@pytest.mark.slow
def test_eight_async_processes_do_not_wait_for_one_slowed_five_times(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> None:
    """Counted from the moment all eight have run an update (they start seconds apart) until
    every fast node has run 15 more: the slowed node runs at most a third as many meanwhile."""
    config = node_config(tmp_path, synth_dir, build("ring", 8),
                         ["sim.nodes=8", "run.rounds=1000", "eval.every=100000", *ASYNC])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    folder = tmp_path / "nodes"
    try:
        for i in range(8):
            procs.start(i, *(["--set", "node.slowdown=5"] if i == 0 else []))
        wait_for(lambda: all(rounds_done(folder, i) >= 1 for i in range(8)), 200, "every node's first update")
        first = {i: rounds_done(folder, i) for i in range(8)}
        wait_for(lambda: all(rounds_done(folder, i) >= first[i] + 15 for i in range(1, 8)), 200, "15 more updates")
        done = {i: rounds_done(folder, i) - first[i] for i in range(8)}
        for proc in procs.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = procs.wait_all(60)
    finally:
        procs.close()
    assert codes == {i: 0 for i in range(8)}
    assert min(done[i] for i in range(1, 8)) >= 3 * done[0], done
    # Once every node runs, each fast node mixes in every update: its neighbours' states (the
    # slowed node's too) stay fresh for max_staleness of its own updates. Its first updates may
    # come before any neighbour's first message has arrived, so the last ten are checked.
    assert all(r["heard"] > 0 for i in range(1, 8) for r in _lines(folder, i)[-10:]), "fast nodes mix"


@pytest.mark.slow
def test_kill_9_of_an_async_node_loses_at_most_its_last_update_and_it_rejoins_at_once(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> None:
    rounds = 12
    config = node_config(tmp_path, synth_dir, build("ring", 3),
                         ["sim.nodes=3", f"run.rounds={rounds}", "eval.every=1000", *ASYNC])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    folder = tmp_path / "nodes"
    try:
        for i in range(3):
            procs.start(i)
        # Node 1 is killed after its fourth update, once its neighbours have logged updates of
        # their own (a neighbour that has not yet started has no log to read what it mixed from).
        wait_for(lambda: rounds_done(folder, 1) >= 4 and min(rounds_done(folder, i) for i in (0, 2)) >= 1, 120,
                 "node 1's fourth update and its neighbours' first", poll=0.02)
        procs.procs[1].send_signal(signal.SIGKILL)
        procs.procs[1].wait(10)
        logged = rounds_done(folder, 1)
        at_kill = checkpoint.load(folder / "node-1" / checkpoint.FILE_NAME, 1).round
        seen = max(r["mixed"].get("1", 0) for i in (0, 2) for r in _lines(folder, i))
        procs.start(1)
        codes = procs.wait_all(180)
    finally:
        procs.close()
    assert codes == {0: 0, 1: 0, 2: 0}
    assert at_kill >= logged and at_kill >= seen - 1, (at_kill, logged, seen)
    assert f"resuming after round {at_kill} " in procs.log(1) and "waiting for" not in procs.log(1)
    assert [r["round"] for r in _lines(folder, 1)] == list(range(1, rounds + 1))
    for i in range(3):
        assert checkpoint.load(folder / f"node-{i}" / checkpoint.FILE_NAME, i).round == rounds


@pytest.mark.slow
def test_hostile_messages_are_rejected_by_an_async_node(tmp_path: Path, synth_dir: Path,  # noqa: ANN001
                                                       synth_data, tiny_cfg) -> None:
    """Node 0 of a two-node path, async, with no local steps: the test plays node 1. Every hostile
    message is counted and dropped, the node keeps running and its shared adapter stays what
    it was; a well-formed message (node 0's own state) is then mixed, which changes nothing."""
    config = node_config(tmp_path, synth_dir, nx.path_graph(2),
                         ["sim.nodes=2", "run.rounds=100000", "train.local_steps=0", "node.slowdown=20",
                          "node.summary_s=1", *ASYNC])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    folder, total = tmp_path / "nodes", 1000
    ctx = zmq.Context()
    try:
        node = procs.start(0)
        wait_for(lambda: rounds_done(folder, 0) >= 1, 120, "node 0's first update")
        params = node_params(folder, 0)
        names = sorted(k for k in params if ".shared" in k)
        before = shared_hash(folder, 0, names)
        good = Message(MessageType.GOSSIP, 1, 1, "none", {k: params[k][0].numpy() for k in names})
        peer = _neighbour_socket(ctx, config)
        rng = random.Random(0)
        for _ in range(total):
            peer.send_multipart(_hostile(rng, good, names))
        wait_for(lambda: f"({total} in all)" in procs.log(0), 120, f"{total} refusals")
        assert node.poll() is None
        assert all(not r["mixed"] for r in _lines(folder, 0))
        assert shared_hash(folder, 0, names) == before
        peer.send_multipart(encode(good))
        wait_for(lambda: any(r["mixed"] == {"1": 1} for r in _lines(folder, 0)), 60, "the good state mixed")
        assert shared_hash(folder, 0, names) == before
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
        peer.close(0)
    finally:
        ctx.term()
        procs.close()
    assert f"{total} messages or handshakes refused" in procs.log(0)
