"""Nodes that join a running network: the simulator's ``sim.join`` schedule, and the real node's
join request and answer, hostile ones included."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from p2prec.cli import main as p2prec_main
from p2prec.config import ConfigError, load
from p2prec.gossip.codecs import get_codec
from p2prec.gossip.mixing import TRACK
from p2prec.learn.tracking import TRACKER
from p2prec.model.backbone import build_backbone
from p2prec.node.cli import build_node
from p2prec.node.inbox import Inbox
from p2prec.node.join import JoinDesk, adopt
from p2prec.node.transport import routing_id
from p2prec.serve.state import read_manifest
from p2prec.sim.cli import main as sim_main
from p2prec.sim.engine import Simulation
from p2prec.sim.plan import JoinPlan, parse_join
from p2prec.sim.runner import build_topology
from p2prec.wire import Message, MessageType, WireSpec, encode, validate_and_decode
from tests.conftest import TINY
from tests.node_support import Procs, make_backbone, node_config, rounds_done, wait_for


def _sim(synth_dir: Path, synth_data, extra: list[str]) -> Simulation:  # noqa: ANN001
    cfg = load(None, TINY + [f"data.dir={synth_dir}", "train.backbone_dropout=false", "sim.nodes=8",
                             "gossip.topology=ring", "model.text_encoder=none"] + extra)
    m = cfg.model
    backbone = build_backbone(synth_data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=2)
    backbone.requires_grad_(False)
    return Simulation(cfg, synth_data, backbone, build_topology(cfg, 8))


def test_join_specs_parse_and_bad_ones_name_the_key() -> None:
    assert parse_join("100:5%", 754) == (100, 38)
    assert parse_join("7:3", 10) == (7, 3)
    for bad in ("100", "x:5%", "1:2", "10:0", "10:100%", "10:5%%"):
        with pytest.raises(ConfigError, match="sim.join"):
            parse_join(bad, 10)
    cfg = load(None, ["sim.join=5:3,9:2"]).sim
    plan = JoinPlan(cfg, 10, 0)
    first, second = (set(c.nodes.tolist()) for c in plan.cohorts)
    assert len(first) == 3 and len(second) == 2 and not first & second
    assert set(np.flatnonzero(plan.absent(4))) == first | second
    assert set(np.flatnonzero(plan.absent(5))) == second and not plan.absent(9).any()
    assert set(plan.joining(5).tolist()) == first and not len(plan.joining(6))
    assert set(np.flatnonzero(~plan.founders())) == first | second
    with pytest.raises(ConfigError, match="no node"):
        JoinPlan(load(None, ["sim.join=5:6,9:4"]).sim, 10, 0)


@pytest.mark.parametrize("tracking", [False, True])
def test_joiners_are_absent_like_down_nodes_then_start_from_a_neighbour(synth_dir, synth_data,  # noqa: ANN001
                                                                      tracking: bool) -> None:
    extra = ["sim.join=3:2", f"gossip.tracking={str(tracking).lower()}"]
    joined = _sim(synth_dir, synth_data, extra)
    joiners = joined.joins.cohorts[0].nodes
    down = _sim(synth_dir, synth_data, [f"gossip.tracking={str(tracking).lower()}",
                                        f"sim.down=1-2:{'+'.join(map(str, joiners))}"])
    initial = {k: v[joiners].clone() for k, v in joined.pop.params.items()}
    for rnd in (1, 2):
        joined.step(rnd)
        down.step(rnd)
    for k, v in joined.pop.params.items():
        assert torch.equal(v, down.pop.params[k]), k  # absent is exactly down: no training, no messages
        assert torch.equal(v[joiners], initial[k])
    joined._join(3, np.zeros(8, dtype=bool))
    sources = joined.join_sources[3]
    assert sorted(sources) == sorted(joiners.tolist())
    for node, source in sources.items():
        assert source in set(joined.graph.neighbors(node)) and source not in joiners
        for k, v in joined.pop.params.items():
            expected = v[source] if k in joined.pop.shared_names else initial[k][list(joiners).index(node)]
            assert torch.equal(v[node], expected), k
    if tracking:
        assert all(float(joined.pop.state[TRACKER + k][joiners].abs().max()) == 0 for k in joined.pop.shared_names)


def test_under_privacy_a_joiners_copied_state_is_its_reference_not_an_update(  # noqa: ANN001
        synth_dir, synth_data) -> None:
    """The update a joiner releases in its first round is measured from the state it copied."""
    sim = _sim(synth_dir, synth_data, ["sim.join=3:2", "privacy.enabled=true"])
    sim.step(1)
    sim.step(2)
    before = {k: sim.pop.params[k].clone() for k in sim.pop.shared_names}
    privacy, references = sim.stack.privacy, []
    release = privacy.release
    privacy.release = lambda shared, round_, active: (references.append(privacy.reference),
                                                      release(shared, round_, active))
    sim.step(3)
    assert len(references) == 1 and sim.join_sources[3]
    for node, source in sim.join_sources[3].items():
        for k in sim.pop.shared_names:
            assert torch.equal(references[0][k][node], before[k][source])


def test_zero_mode_joiners_keep_their_fresh_adapters(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.join=3:2", "sim.join_mode=zero"])
    joiners = sim.joins.cohorts[0].nodes
    before = {k: v[joiners].clone() for k, v in sim.pop.params.items()}
    sim.step(1)
    sim.step(2)
    sim._join(3, np.zeros(8, dtype=bool))
    assert not sim.join_sources[3]
    for k, v in sim.pop.params.items():
        assert torch.equal(v[joiners], before[k])


def test_sim_cli_records_the_joiners_first_rounds(tmp_path: Path, synth_dir: Path, cache_dir: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "5", "--nodes", "10",
            "--topology", "ring", "--out", str(out), "--set", "sim.join=3:20%", "--set", "sim.join_window=2",
            "--set", "model.text_encoder=none"] + [a for o in TINY for a in ("--set", o)]
    assert sim_main(args) == 0
    assert "joined at round 3: 2 nodes (neighbour, 2 from a neighbour)" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "join.jsonl").read_text().splitlines()]
    assert [(r["round"], r["rounds_joined"]) for r in records] == [(3, 1), (4, 2)]
    assert set(records[0]) >= {"joiners", "founders", "mode", "protocol"}
    assert set(records[0]["joiners"]["test"]) >= {"hr@10", "ndcg@10", "mrr"}
    cohort = json.loads((out / "summary.json").read_text())["join"]["cohorts"][0]
    assert cohort["round"] == 3 and cohort["nodes"] == 2 and cohort["from_neighbour"] == 2
    mean = np.mean([r["joiners"]["test"]["ndcg@10"] for r in records])
    assert cohort["joiners_test_ndcg@10_first_10"] == pytest.approx(mean)
    bad = args[:-len(TINY) * 2] + ["--set", "sim.join=3:100%"] + [a for o in TINY for a in ("--set", o)]
    assert sim_main(bad) == 2
    assert "sim.join" in capsys.readouterr().err


class _Plain:
    """A transport stand-in for :meth:`Node._accept`: plaintext, so no key names a sender."""

    def key_owner(self, _frames: list) -> None:
        return None


@pytest.fixture()
def node0(tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg):  # noqa: ANN001, ANN201
    """Node 0 of a path 0-1-2, built as ``p2prec-node`` builds it: node 1 is its only neighbour."""
    config = node_config(tmp_path, synth_dir, nx.path_graph(3), ["sim.nodes=3", "run.rounds=4",
                                                                 "model.text_encoder=none"])
    cfg = load(config)
    node = build_node(cfg, 0, str(make_backbone(synth_data, cfg, tmp_path / "bb")))
    node.resume()
    return node


def _state(node, sender: int = 1, round_: int = 2, **change) -> Message:  # noqa: ANN001
    tensors = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in node.learner.shared().items()}
    return replace(Message(MessageType.JOIN_STATE, sender, round_, node.stack.codec.name, tensors), **change)


def test_join_messages_are_validated_and_hostile_ones_rejected(node0) -> None:  # noqa: ANN001
    node, inbox = node0, Inbox(0, 2)

    def offer(msg: Message, routing: int | None = None) -> int:
        before = len(node.rejections)
        node._accept(routing_id(msg.sender if routing is None else routing), encode(msg), inbox, _Plain())
        return len(node.rejections) - before

    request = Message(MessageType.JOIN_REQUEST, 1, 0, node.stack.codec.name, {})
    assert offer(request) == 0 and offer(request) == 0 and node.joins.requests == {1}
    good = _state(node)
    name = next(iter(good.tensors))
    assert offer(replace(request, tensors={name: good.tensors[name]})) == 1  # a request carries no tensors
    assert offer(good) == 1  # nobody asked
    node.joins.answers = {}
    hostile = [
        _state(node, sender=2),  # not a neighbour
        replace(good, sender=2),  # the header names another node than the connection
        replace(good, codec="int8"),
        _state(node, round_=5),  # beyond the run's four rounds
        replace(good, tensors={**good.tensors, name: np.full_like(good.tensors[name], np.nan)}),
        replace(good, tensors={**good.tensors, name: good.tensors[name][..., :-1]}),
        replace(good, tensors={k: v for k, v in good.tensors.items() if k != name}),
    ]
    for k, msg in enumerate(hostile):
        assert offer(msg, routing=1 if k == 1 else None) == 1, k
    assert node.joins.answers == {}
    assert offer(good) == 0 and list(node.joins.answers) == [1]
    assert offer(good) == 1  # a second answer from the same peer
    own = node.learner.shared()
    adopt(node.learner, node.joins.answers[1])
    for k, v in node.learner.shared().items():
        expected = own[k] if k.startswith(TRACK) else good.tensors[k]
        assert np.array_equal(v, expected), k


class _Queues:
    """A transport stand-in whose queue to ``full`` peers is full: their sends queue nothing."""

    def __init__(self, full: set[int]) -> None:
        self.full = full
        self.sent: list[tuple[int, int]] = []

    async def send(self, peer: int, frames: list) -> int:
        if peer in self.full:
            return 0
        header = validate_and_decode(frames, WireSpec({"w": (2,)}, 1 << 20))
        self.sent.append((peer, header.round))
        return 1


class _Shared:
    """A learner stand-in: only the shared state the answer carries."""

    def shared(self) -> dict[str, np.ndarray]:
        return {"w": np.ones(2, dtype=np.float32)}


async def test_a_join_answer_that_cannot_be_queued_is_sent_after_the_next_round() -> None:
    desk = JoinDesk(0, 10)
    desk.take(Message(MessageType.JOIN_REQUEST, 1, 0, "none", {}), Inbox(0, 2))
    desk.take(Message(MessageType.JOIN_REQUEST, 2, 0, "none", {}), Inbox(0, 2))
    queues = _Queues(full={2})
    await desk.answer(queues, _Shared(), get_codec("none"), 4)
    assert queues.sent == [(1, 4)] and desk.requests == {2}
    queues.full.clear()
    await desk.answer(queues, _Shared(), get_codec("none"), 5)
    await desk.answer(queues, _Shared(), get_codec("none"), 6)
    assert queues.sent == [(1, 4), (2, 5)] and not desk.requests


@pytest.mark.slow
def test_a_node_started_late_with_join_starts_from_its_neighbours_round(  # noqa: ANN001
        tmp_path: Path, synth_dir: Path, synth_data, tiny_cfg, capsys: pytest.CaptureFixture) -> None:
    """Nodes 0 and 1 of a triangle run without node 2, which starts late with ``--join``: it
    continues from the most advanced answer's round, the run completes everywhere, and
    ``p2prec recommend`` serves node 2's user from its state folder."""
    config = node_config(tmp_path, synth_dir, nx.complete_graph(3),
                         ["sim.nodes=3", "run.rounds=400", "eval.every=100", "node.deadline_s=2",
                          "node.start_timeout_s=3", "model.text_encoder=none"])
    procs = Procs(config, make_backbone(synth_data, tiny_cfg, tmp_path / "bb"))
    folder = tmp_path / "nodes"
    try:
        procs.start(0)
        procs.start(1)
        wait_for(lambda: min(rounds_done(folder, 0), rounds_done(folder, 1)) >= 3, 180, "rounds 1-3 without node 2")
        procs.start(2, "--join")
        assert procs.wait_all(240) == {0: 0, 1: 0, 2: 0}
    finally:
        procs.close()
    assert "joined from node" in procs.log(2)
    rounds = [json.loads(line)["round"] for line in (folder / "node-2" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0] >= 4 and rounds[-1] == 400
    user = min(read_manifest(folder / "node-2").users)
    assert p2prec_main(["recommend", "--state", str(folder / "node-2"), "--user", str(user), "--k", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_the_present_arm_measures_the_same_cohort_without_taking_it_away(synth_dir, synth_data) -> None:  # noqa: ANN001
    present = _sim(synth_dir, synth_data, ["sim.join=3:2", "sim.join_mode=present"])
    joined = _sim(synth_dir, synth_data, ["sim.join=3:2"])
    plain = _sim(synth_dir, synth_data, [])
    cohort = present.joins.cohorts[0].nodes
    assert np.array_equal(cohort, joined.joins.cohorts[0].nodes)  # the same users in every arm
    for rnd in (1, 2, 3):
        assert not present.joins.absent(rnd).any() and not len(present.joins.joining(rnd))
        present.step(rnd)
        plain.step(rnd)
    assert not present.join_sources
    for k, v in present.pop.params.items():
        assert torch.equal(v, plain.pop.params[k]), k  # measuring a cohort changes no training
    present._measure_joiners(3)
    assert present.join_log[0]["mode"] == "present" and present.join_log[0]["rounds_joined"] == 1


def _log(values: list[tuple[float, float]]) -> list[dict]:
    return [{"round": 10 + i, "rounds_joined": i + 1, "joiners": {"val": {"ndcg@10": j + 0.1}, "test": {"ndcg@10": j}},
             "founders": {"val": {"ndcg@10": f}, "test": {"ndcg@10": f}}} for i, (j, f) in enumerate(values)]


def test_the_joins_report_compares_each_arm_with_the_control_round_by_round(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    from p2prec.run.joins import main as joins_main, report
    runs = {"present": _log([(0.40, 0.45), (0.40, 0.45), (0.40, 0.45)]),
            "zero": _log([(0.30, 0.45), (0.38, 0.45), (0.41, 0.45)])}
    table = report(runs, "present", first=2).splitlines()
    assert table[2] == "| present | 0.5000 | 0.4000 | +0.0000 | 0.4500 / 0.4500 | 1 | never |"
    assert table[3] == "| zero | 0.4400 | 0.3400 | -0.0600 | 0.4500 / 0.4500 | 3 | never |"
    with pytest.raises(ValueError, match="not the same schedule"):
        report({"present": runs["present"][:2], "zero": runs["zero"]}, "present")
    assert joins_main([f"present={tmp_path}"]) == 2
    assert "join.jsonl: no such file" in capsys.readouterr().err
    for damaged in ("{not json\n", json.dumps({"round": 1}) + "\n"):
        (tmp_path / "join.jsonl").write_text(damaged)
        assert joins_main([f"present={tmp_path}"]) == 2
        assert "not a join log of p2prec-sim" in capsys.readouterr().err
