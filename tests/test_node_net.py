"""Real node processes on 127.0.0.1: equivalence with the simulator, crashes, dead and hostile peers.

Every test bounds its waits and kills what it started in a ``finally``; ports are picked free.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import networkx as nx
import numpy as np
import pytest
import zmq

from p2prec.config import load
from p2prec.gossip.privacy import epsilon
from p2prec.run import checkpoint
from p2prec.run.checkpoint import OPT, PARAM
from p2prec.sim.cli import main as sim_main
from p2prec.topology import build
from p2prec.topology.roles import AGGREGATOR, AGGREGATOR_ONLY, CLIENT
from p2prec.wire import Message, MessageType, encode
from tests.node_support import (
    NODE_SETS,
    Procs,
    make_backbone,
    max_diff,
    node_config,
    rounds_done,
    shared_hash,
    simulate,
    wait_for,
)

pytestmark = pytest.mark.slow


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def _launch(tmp_path: Path, synth_dir: Path, backbone: Path, processes: int, extra: list[str]) -> Path:
    """``p2prec-sim --processes``, in-process; returns the run folder."""
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "3", "--processes", str(processes),
            "--backbone", str(backbone), "--out", str(out)]
    assert sim_main(args + _sets(NODE_SETS + ["node.deadline_s=60", "node.start_timeout_s=120"] + extra)) == 0
    return out


@pytest.mark.parametrize("settings", [["gossip.codec=none", "gossip.exchanges=2"],
                                      ["gossip.codec=int8", "gossip.exchanges=1"],
                                      ["gossip.tracking_fraction=0.5", "gossip.tracking_weight=samples"],
                                      ["gossip.mixing=matching"], ["gossip.mixing=matching", "gossip.exchanges=2"],
                                      ["gossip.topology=complete", "gossip.mixing=hypercube", "gossip.wire_names=index"],
                                      ["gossip.topology=complete", "gossip.mixing=hypercube", "gossip.codec=int4",
                                       "gossip.quant_block=64", "gossip.exchanges=1", "gossip.wire_names=index"]])
def test_eight_processes_on_a_ring_match_the_simulator(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                       tiny_cfg, settings: list[str]) -> None:
    """Gradient tracking is on (the default): the trackers travel and are mixed with the shared
    adapter, and the checkpoints hold them. Plain float32 runs the default's two exchanges a
    round. With ``int8``, nodes mix what they decoded from their neighbours with their own true
    state and keep the sender's residual, exactly as the simulator does (one exchange: a second
    one quantizes states the node and the simulator summed in different orders, and a 1e-7
    difference can round to the next of 255 levels). With ``tracking_fraction``, each node draws its own participation; with
    ``tracking_weight=samples``, each weighs its gradient by its own interaction count; with
    ``mixing=matching``, each draws the round's matching and talks to its partner only; with
    ``exchanges=2`` too, a second matching per round, whose messages name their exchange; with
    ``mixing=hypercube`` (on the complete topology), each exchange's partner differs in the
    next bit of the seeded labels, in float32 and in int4, both under numbered wire names."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 8, ["gossip.topology=ring", *settings])
    assert {"config.toml", "metrics.jsonl", "summary.json", "convergence.png"} <= {p.name for p in out.iterdir()}
    sim = simulate(out / "config.toml", synth_data, backbone)
    assert max_diff(sim, out / "nodes", list(range(8)), sim.pop.shared_names) < 1e-5
    assert max_diff(sim, out / "nodes", list(range(8)), list(sim.pop.params)) < 1e-5
    for i in range(8):
        state = checkpoint.load(out / "nodes" / f"node-{i}" / checkpoint.FILE_NAME, i).tensors
        for k, v in sim.pop.state.items():
            scale = max(1.0, float(v[i].abs().max()))  # count-weighted gradients reach ~10
            assert float((state[OPT + k][0] - v[i]).abs().max()) < 1e-5 * scale, (i, k)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    final = sim.evaluate()["val"]["sampled"]
    assert records[-1]["val"]["sampled"]["hr@10"] == pytest.approx(final["hr@10"], abs=1e-9)
    assert records[-1]["consensus_distance"] == pytest.approx(sim.consensus[-1], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 8
    assert summary["bytes_per_node_per_round"] == pytest.approx(sim.bytes_sent_total / (8 * 3))
    exchanges = sim.cfg.gossip.exchanges
    every_edge = 8 * 3 * 2 * (sim.msg_bytes + (exchanges - 1) * sim.later_msg_bytes)  # two neighbours on a ring
    one_partner = any(s in settings for s in ("gossip.mixing=matching", "gossip.mixing=hypercube"))
    assert sim.bytes_sent_total < every_edge if one_partner else sim.bytes_sent_total == every_edge


@pytest.mark.parametrize("settings", [["gossip.topology=ring"],
                                      ["gossip.topology=complete", "gossip.mixing=matching", "gossip.codec=int4",
                                       "gossip.quant_block=64", "gossip.wire_names=index"]])
def test_four_processes_report_the_simulators_bytes(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                    tiny_cfg, settings: list[str]) -> None:
    """The rehearsal's ``summary.json`` and ``metrics.jsonl`` give, within 1%, the bytes the
    simulator counts for the same run, sent and sent plus received: real nodes count the
    frames they queued and the frames of the messages they collected, the simulator counts
    the real encoder's frames of one message per delivered entry of its mixing matrices."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 4, settings)
    sim = simulate(out / "config.toml", synth_data, backbone)
    summary = json.loads((out / "summary.json").read_text())
    expected = sim.traffic(3)
    assert expected["bytes_sent_received_per_node_per_round"] > expected["bytes_per_node_per_round"] > 0
    for key in ("bytes_per_node_per_round", "bytes_sent_received_per_node_per_round"):
        assert summary[key] == pytest.approx(expected[key], rel=0.01), key
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bytes_sent_received_per_node_per_round"] == pytest.approx(
        summary["bytes_sent_received_per_node_per_round"])


def test_secured_processes_match_the_simulator(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                               tiny_cfg) -> None:
    """``security.enabled``: the launcher keys three nodes, which gossip over CurveZMQ only."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 3, ["gossip.topology=ring", "security.enabled=true",
                                                     f"security.key_dir={tmp_path / 'unused'}"])
    assert sorted(p.name for p in (out / "keys").iterdir()) == [f"node{i}{s}" for i in range(3)
                                                                 for s in (".key", ".key_secret")]
    assert all("(CurveZMQ)" in (out / "nodes" / f"node-{i}.log").read_text() for i in range(3))
    sim = simulate(out / "config.toml", synth_data, backbone)
    assert max_diff(sim, out / "nodes", list(range(3)), sim.pop.shared_names) < 1e-5


def test_processes_with_a_robust_rule_match_the_simulator(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                          tiny_cfg) -> None:
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 4, ["gossip.topology=ring", "robust.rule=median"])
    sim = simulate(out / "config.toml", synth_data, backbone)
    assert max_diff(sim, out / "nodes", list(range(4)), sim.pop.shared_names) < 1e-5
    mean = simulate(out / "config.toml", synth_data, backbone, ["robust.rule=mean"])
    assert max_diff(mean, out / "nodes", list(range(4)), sim.pop.shared_names) > 1e-4  # the rule made a difference


def test_private_processes_release_what_the_simulator_does(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                           tiny_cfg) -> None:
    """With seeded noise (a reproducibility switch, never a real node's default) each node
    clips and noises its update with its own (seed, round, node) noise, as the simulator does
    for that node, and reports its epsilon."""
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 4, ["gossip.topology=ring", "privacy.enabled=true",
                                                     "privacy.seeded_noise=true",
                                                     "privacy.clip=0.05", "privacy.noise_multiplier=0.5"])
    sim = simulate(out / "config.toml", synth_data, backbone)
    assert max_diff(sim, out / "nodes", list(range(4)), list(sim.pop.params)) < 1e-5
    plain = simulate(out / "config.toml", synth_data, backbone, ["privacy.enabled=false"])
    assert max_diff(plain, out / "nodes", list(range(4)), sim.pop.shared_names) > 1e-3  # the noise is there
    for i in range(4):
        records = [json.loads(x) for x in (out / "nodes" / f"node-{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epsilon"] for r in records] == [pytest.approx(epsilon(0.5, r, 1e-5)) for r in (1, 2, 3)]
    merged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert merged[-1]["epsilon"] == pytest.approx(sim.epsilon())


@pytest.mark.parametrize("exchanges", [1, 2])
def test_edge_hierarchy_processes_match_the_simulator(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                      tiny_cfg, exchanges: int) -> None:
    """Six clients, a training aggregator (6) and an aggregator-only one (7): eight processes;
    with two exchanges every round goes up, across and down twice."""
    graph = nx.Graph()
    graph.add_nodes_from(range(6), role=CLIENT)
    graph.add_node(6, role=AGGREGATOR)
    graph.add_node(7, role=AGGREGATOR_ONLY)
    for client, hub in zip(range(6), (6, 6, 6, 7, 7, 7)):
        graph.nodes[client]["aggregator"] = hub
        graph.add_edge(client, hub)
    graph.add_edge(6, 7)
    nx.write_graphml(graph, tmp_path / "hierarchy.graphml")
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = _launch(tmp_path, synth_dir, backbone, 7, [f"gossip.topology={tmp_path / 'hierarchy.graphml'}",
                                                     f"gossip.exchanges={exchanges}"])
    sim = simulate(out / "config.toml", synth_data, backbone)
    assert sim.plan.kind == "hierarchy"
    assert max_diff(sim, out / "nodes", list(range(7)), sim.pop.shared_names) < 1e-5
    assert not (out / "nodes" / "node-7" / "metrics.jsonl").exists()
    assert rounds_done(out / "nodes", 7) == 3
    summary = json.loads((out / "summary.json").read_text())
    for key, value in sim.traffic(3).items():
        if key.endswith("per_node_per_round"):
            assert summary[key] == pytest.approx(value, rel=0.01), key


def _ring_nodes(tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg, extra: list[str]) -> Procs:  # noqa: ANN001
    config = node_config(tmp_path, synth_dir, build("ring", 4), ["sim.nodes=4"] + extra)
    return Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))


class CheckpointReader(threading.Thread):
    """Reads every node's checkpoint in a loop, recording any that cannot be read."""

    def __init__(self, folder: Path, nodes: list[int]) -> None:
        super().__init__(daemon=True)
        self.folder, self.nodes = folder, nodes
        self.reads, self.errors = 0, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for i in self.nodes:
                path = self.folder / f"node-{i}" / checkpoint.FILE_NAME
                if path.exists():
                    try:
                        checkpoint.load(path, i)
                        self.reads += 1
                    except checkpoint.CheckpointError as exc:
                        self.errors.append(str(exc))
            time.sleep(0.01)


def test_a_node_killed_mid_run_resumes_and_the_run_completes(tmp_path: Path, synth_dir: Path,  # noqa: ANN001
                                                             synth_data, tiny_cfg) -> None:
    rounds = 200
    procs = _ring_nodes(tmp_path, synth_dir, synth_data, tiny_cfg,
                        [f"run.rounds={rounds}", "eval.every=1000", "node.deadline_s=2", "node.start_timeout_s=8"])
    folder = tmp_path / "nodes"
    reader = CheckpointReader(folder, [0, 1, 2, 3])
    reader.start()
    try:
        for i in range(4):
            procs.start(i)
        wait_for(lambda: rounds_done(folder, 2) >= 3, 120, "node 2 to finish 3 rounds", poll=0.02)
        procs.procs[2].send_signal(signal.SIGKILL)
        procs.procs[2].wait(10)
        at_kill = checkpoint.load(folder / "node-2" / checkpoint.FILE_NAME, 2).round
        assert at_kill < rounds
        neighbours_at_kill = rounds_done(folder, 1)
        procs.start(2)
        wait_for(lambda: "resuming after" in procs.log(2), 60, "node 2 to restart")
        neighbours_at_restart = rounds_done(folder, 1)
        codes = procs.wait_all(180)
    finally:
        reader.halt.set()
        procs.close()
    reader.join(5)
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    assert reader.errors == [] and reader.reads > 50
    assert f"resuming after round {at_kill} " in procs.log(2)
    lines = [json.loads(x) for x in (folder / "node-2" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, rounds + 1))
    neighbour = [json.loads(x) for x in (folder / "node-1" / "rounds.jsonl").read_text().splitlines()]
    assert any(r["heard"] < r["expected"] for r in neighbour[neighbours_at_kill:])
    # Node 2's crash and its restart behind them cost its neighbours one deadline at most: its
    # hello names the round it resumes at, and its messages for their past rounds change nothing.
    assert sum(r["round_s"] > 2 for r in neighbour[neighbours_at_kill:]) <= 1
    for i in range(4):
        assert checkpoint.load(folder / f"node-{i}" / checkpoint.FILE_NAME, i).round == rounds


def test_a_neighbour_that_never_starts_costs_one_deadline_and_weights_renormalise(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> None:
    procs = _ring_nodes(tmp_path, synth_dir, synth_data, tiny_cfg,
                        ["run.rounds=3", "node.deadline_s=20", "node.start_timeout_s=10"])
    try:
        for i in (0, 1, 2):
            procs.start(i)
        codes = procs.wait_all(150)
    finally:
        procs.close()
    assert codes == {0: 0, 1: 0, 2: 0}
    folder = tmp_path / "nodes"
    for i, heard in ((0, 1), (1, 2), (2, 1)):
        lines = [json.loads(x) for x in (folder / f"node-{i}" / "rounds.jsonl").read_text().splitlines()]
        assert [(r["heard"], r["expected"]) for r in lines] == [(heard, 2)] * 3, i
    assert "no word at start-up from nodes [3]" in procs.log(0)
    sim = simulate(tmp_path / "config.toml", synth_data, procs.backbone, ["sim.down=1-3:3"])
    assert max_diff(sim, folder, [0, 1, 2], sim.pop.shared_names) < 1e-5


def _hostile(rng: random.Random, good: Message, names: list[str]) -> list[bytes]:
    """One malformed message of a randomly chosen kind, as frames."""
    frames = [bytes(memoryview(f)) for f in encode(good)]
    header = msgpack.unpackb(frames[0])
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:  # truncated
        cut = rng.randrange(1, len(frames))
        return frames[:cut] + [frames[cut][: rng.randrange(len(frames[cut]))]]
    if kind == 2:  # oversized: a large extra payload
        return [*frames, b"\0" * rng.randrange(10_000, 200_000)]
    if kind == 3:  # wrong version
        header["v"] = rng.choice([0, 2, 99, "1", None])
        return [msgpack.packb(header), *frames[1:]]
    if kind == 4:  # wrong shape
        entry = header["tensors"][rng.randrange(len(header["tensors"]))]
        entry[2] = [entry[2][0] + 1, *entry[2][1:]]
        entry[3] = int(np.prod(entry[2])) * 4
        return [msgpack.packb(header), *frames[1:]]
    if kind == 5:  # NaN or Inf in a tensor
        tensors = {k: v.copy() for k, v in good.tensors.items()}
        victim = tensors[rng.choice(names)].reshape(-1)
        victim[rng.randrange(victim.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return [bytes(memoryview(f)) for f in encode(Message(good.type, good.sender, good.round, "none", tensors))]
    if kind == 6:  # a sender that is not this connection, or not a peer
        header["sender"] = rng.choice([0, 5, 2**40, -1])
        return [msgpack.packb(header), *frames[1:]]
    if kind == 7:  # a type a flat node does not take, or no type at all
        header["type"] = rng.choice([int(MessageType.AGGREGATE_DOWN), 77])
        return [msgpack.packb(header), *frames[1:]]
    header["extra"] = "x" * rng.randrange(1, 100_000)  # unknown key, possibly a huge header
    return [msgpack.packb(header), *frames[1:]]


def _address(config: Path, node: int) -> str:
    topology = json.loads(Path(load(config).gossip.topology).read_text())
    return next(n["address"] for n in topology["nodes"] if n["id"] == node)


def _neighbour_socket(ctx: zmq.Context, config: Path) -> zmq.Socket:
    """A plaintext DEALER that speaks to node 0 as node 1 does (routing id ``n1``)."""
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.ROUTING_ID, b"n1")
    peer.setsockopt(zmq.SNDTIMEO, 20000)
    peer.connect(_address(config, 0))
    return peer


def test_hostile_messages_are_rejected_and_leave_the_shared_adapter_unchanged(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg) -> None:
    """Node 0 of a two-node topology; the test plays node 1. Round 1 can only complete with a
    message from node 1, so anything hostile that were accepted would be mixed in. Round 2
    then waits for node 1 until SIGTERM, which must abandon it and exit 0. Without gradient
    tracking, so that a well-formed message is exactly the shared adapter read from a checkpoint."""
    config = node_config(tmp_path, synth_dir, nx.path_graph(2),
                         ["sim.nodes=2", "run.rounds=2", "train.local_steps=0", "node.deadline_s=600",
                          "gossip.tracking=false",
                          "node.start_timeout_s=600", "node.summary_s=1"])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    folder, total = tmp_path / "nodes", 3000
    ctx = zmq.Context()
    try:
        node = procs.start(0)
        wait_for(lambda: "listening on" in procs.log(0), 120, "node 0 to listen")
        params = checkpoint.load(folder / "node-0" / checkpoint.FILE_NAME, 0).tensors
        names = sorted(k[len(PARAM):] for k in params if ".shared" in k)
        before = shared_hash(folder, 0, names)
        good = Message(MessageType.GOSSIP, 1, 1, "none", {k: params[PARAM + k][0].numpy() for k in names})
        giant = ctx.socket(zmq.DEALER)
        giant.connect(_address(config, 0))
        giant.send_multipart([b"\0" * (8 << 20)])
        peer = _neighbour_socket(ctx, config)
        rng = random.Random(0)
        for k in range(total):
            if k == total // 2:  # from here on node 0 is in round 1, waiting for node 1
                peer.send_multipart(encode(Message(MessageType.HELLO, 1, 0, "none", {})))
            peer.send_multipart(_hostile(rng, good, names))
        wait_for(lambda: f"({total} in all)" in procs.log(0), 120, f"{total} refusals")
        assert node.poll() is None
        peer.send_multipart(encode(good))
        wait_for(lambda: rounds_done(folder, 0) == 1, 60, "round 1 to complete")
        assert shared_hash(folder, 0, names) == before
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
        for sock in (giant, peer):
            sock.close(0)
    finally:
        ctx.term()
        procs.close()
    log = procs.log(0)
    assert f"done after round 1; {total} messages or handshakes refused" in log
    assert len([line for line in log.splitlines() if "refused" in line]) < 40   # counted, not a line each
    assert "node 0 round 1/2: loss nan, heard 1/1" in log
    assert "SIGTERM received" in log and "round 2 abandoned" in log
    assert checkpoint.load(folder / "node-0" / checkpoint.FILE_NAME, 0).round == 1


def _children_of(out: Path) -> list[int]:
    """Pids of processes whose command line names ``out`` (the launcher's nodes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(out).encode() in cmdline and b"p2prec.node.cli" in cmdline:
                pids.append(int(entry.name))
    return pids


def _default_sigint() -> None:
    """Give the launcher a terminal's Ctrl-C even when the tests run in the background.

    Why: a shell without job control starts background commands with SIGINT ignored, the
    child inherits that, and Python then never raises KeyboardInterrupt; the launcher would
    sail through the signal and finish its rounds (CI ran exactly so: exit 0, not 130).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to list processes")
def test_ctrl_c_on_the_launcher_ends_exactly_its_nodes(tmp_path: Path, synth_dir: Path, synth_data,  # noqa: ANN001
                                                      tiny_cfg) -> None:
    backbone = make_backbone(synth_data, tiny_cfg, tmp_path / "bb")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "p2prec.sim.cli", "--dataset", "synthetic", "--data-dir", str(synth_dir),
           "--topology", "ring", "--rounds", "1000", "--processes", "2", "--backbone", str(backbone),
           "--out", str(out)] + _sets(NODE_SETS + ["node.deadline_s=300", "node.start_timeout_s=300"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    err = (tmp_path / "launcher.err").open("wb")
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_default_sigint,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(_children_of(out)) == 2, 60, "two node processes")
        wait_for(lambda: all(rounds_done(out / "nodes", i) >= 1 for i in range(2)), 120, "a round on every node")
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 130
        assert _children_of(out) == []
        assert bystander.poll() is None
    finally:
        for proc in (launcher, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in _children_of(out):
            os.kill(pid, signal.SIGKILL)
        err.close()
    assert "interrupted" in (tmp_path / "launcher.err").read_text()
    for i in range(2):
        assert "SIGTERM received" in (out / "nodes" / f"node-{i}.log").read_text()
