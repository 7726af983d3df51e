"""The simulator: equivalence with a plain per-node loop, consensus rate, hierarchy, faults, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prec.config import load
from p2prec.data.sampler import NegativeSampler
from p2prec.gossip.mixing import TRACK, mix, row_normalise
from p2prec.learn.batches import train_batch
from p2prec.learn.factories import step_settings
from p2prec.learn.local import adam_step, init_opt_state, local_grads, local_step
from p2prec.learn.tracking import (LAST_GRAD, TRACKER, gradient_weights, init_tracking_state, participation,
                                   tracked_step)
from p2prec.model.backbone import build_backbone
from p2prec.sim.cli import main
from p2prec.sim.runner import build_topology
from p2prec.sim.engine import Simulation
from p2prec.rng import seeded_rng
from p2prec.topology import metropolis_hastings, predicted_rate
from tests.conftest import TINY


def _sim(synth_dir: Path, synth_data, extra: list[str]) -> Simulation:  # noqa: ANN001
    cfg = load(None, TINY + [f"data.dir={synth_dir}", "train.backbone_dropout=false", "sim.chunk=3"] + extra)
    m = cfg.model
    backbone = build_backbone(synth_data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=2)
    backbone.requires_grad_(False)
    graph = build_topology(cfg, len(synth_data.nodes(cfg.data.users_per_node)[: cfg.sim.nodes or None]))
    return Simulation(cfg, synth_data, backbone, graph)


def _plain_round(model, params: dict, state: dict, batches: list, settings, shared: list[str],  # noqa: ANN001
                 tracking: bool, weight: float = 1.0) -> tuple[dict, dict]:
    """One node's local work written out plainly: Adam on everything at every step or, with
    tracking, Adam on the private tensors at every step and one tracked shared step along
    the mean gradient times the node's ``weight`` (its sample count by default)."""
    if not tracking:
        for b in batches:
            params, state, _ = local_step(model, params, state, b.inputs, b.targets, b.negatives, settings)
        return params, state
    total = {k: torch.zeros_like(params[k]) for k in shared}
    for b in batches:
        grads, _ = local_grads(model, params, b.inputs, b.targets, b.negatives, settings.loss)
        new, moved = adam_step({k: v for k, v in params.items() if k not in shared}, grads, state, settings)
        params, state = {**params, **new}, {**state, **moved}
        total = {k: total[k] + grads[k] for k in shared}
    stepped, moved = tracked_step({k: params[k] for k in shared}, {k: total[k] * weight / len(batches) for k in shared},
                                  state, settings)
    return {**params, **stepped}, {**state, **moved}


@pytest.mark.parametrize("tracking", [False, True])
def test_vectorized_simulator_matches_a_plain_per_node_loop(synth_dir, synth_data, tracking: bool) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=ring", "train.local_steps=2",
                                       f"gossip.tracking={str(tracking).lower()}"])
    model, cfg, pop = sim.model, sim.cfg, sim.pop
    shared = pop.shared_names
    params = [{k: v[i].clone() for k, v in pop.params.items()} for i in range(8)]
    states = [init_opt_state(p) for p in params]
    if tracking:
        states = [{**st, **init_tracking_state({k: p[k] for k in shared}, st["t"])} for p, st in zip(params, states)]
    w = row_normalise(metropolis_hastings(build_topology(cfg, 8)))
    sampler = NegativeSampler(synth_data)
    for rnd in range(1, 4):
        sim.step(rnd)
        for i in range(8):
            batches = [train_batch(synth_data, sampler, sim.nodes[i], cfg.train.batch_size, cfg.model.max_len,
                                   cfg.train.negatives, seeded_rng(cfg.run.seed, rnd, i, step))
                       for step in range(cfg.train.local_steps)]
            count = sum(len(synth_data.train[u]) for u in sim.nodes[i])
            params[i], states[i] = _plain_round(model, params[i], states[i], batches,
                                                step_settings(cfg, shared), shared, tracking, count)
        gossiped = [{**{k: p[k] for k in shared}, **({TRACK + k: st[TRACKER + k] for k in shared} if tracking else {})}
                    for p, st in zip(params, states)]
        mixed = []
        for i in range(8):
            peers = w[i].indices
            mixed.append(mix(w[i][:, peers], {k: torch.stack([gossiped[j][k] for j in peers]) for k in gossiped[i]}))
        for i in range(8):
            params[i].update({k: mixed[i][k][0] for k in shared})
            states[i].update({TRACKER + k: mixed[i][TRACK + k][0] for k in shared if tracking})
    for i in range(8):
        for k, v in params[i].items():
            assert torch.allclose(pop.params[k][i], v, atol=1e-5), (i, k)
        if tracking:
            for k in shared:
                want = states[i][TRACKER + k]  # count-weighted: entries reach ~10, so the bound scales
                assert torch.allclose(pop.state[TRACKER + k][i], want, atol=1e-6 * max(1.0, float(want.abs().max()))), \
                    (i, k)


def test_consensus_shrinks_at_the_spectral_rate_without_training(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=30", "gossip.topology=small-world:k=4,p=0.2",
                                       "train.local_steps=0"])
    g = torch.Generator().manual_seed(0)
    for k in sim.pop.shared_names:
        sim.pop.params[k].add_(torch.randn(sim.pop.params[k].shape, generator=g))
    rate = predicted_rate(metropolis_hastings(build_topology(sim.cfg, 30)))
    distances = [sim.step(r).consensus for r in range(1, 41)]
    measured = (distances[-1] / distances[9]) ** (1 / 30)
    assert measured == pytest.approx(rate, rel=0.1)
    assert all(b < a for a, b in zip(distances, distances[1:]))


@pytest.mark.parametrize("topology", ["ring", "edge-hierarchy:m=2"])
def test_a_round_of_two_exchanges_mixes_as_a_training_round_then_a_mixing_round(synth_dir, synth_data,  # noqa: ANN001
                                                                                topology: str) -> None:
    """The second exchange sends what the first produced, with a fresh matching draw where
    peers are sampled, and names its index on the wire (a few more bytes per message)."""
    extra = ["sim.nodes=8", f"gossip.topology={topology}", "run.train_rounds=1"]
    twice = _sim(synth_dir, synth_data, extra + ["gossip.exchanges=2"])
    once = _sim(synth_dir, synth_data, extra)
    stats = twice.step(1)
    first, second = once.step(1), once.step(2)
    for k in once.pop.params:
        torch.testing.assert_close(twice.pop.params[k], once.pop.params[k], atol=1e-6, rtol=1e-5)
    assert stats.messages == first.messages + second.messages
    assert stats.bytes_sent == first.bytes_sent + second.messages * twice.later_msg_bytes
    assert twice.msg_bytes < twice.later_msg_bytes < twice.msg_bytes + 16
    matched = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=complete", "gossip.mixing=matching",
                                           "gossip.exchanges=2"])
    assert (matched.plan.flat.round(1, 0) != matched.plan.flat.round(1, 1)).nnz > 0


def test_gossip_keeps_the_trackers_summing_to_the_latest_gradients(synth_dir, synth_data) -> None:  # noqa: ANN001
    """The gradient-tracking invariant: Metropolis mixing is doubly stochastic, so after every
    round the nodes' trackers still add up to their latest local gradients, while the trackers
    themselves are mixed toward each other (the shared step then follows the average)."""
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=ring", "gossip.tracking=true",
                                       "train.local_steps=2"])
    for rnd in range(1, 4):
        sim.step(rnd)
        names = sim.pop.shared_names
        trackers = torch.cat([sim.pop.state[TRACKER + k].flatten(1) for k in names], 1)
        grads = torch.cat([sim.pop.state[LAST_GRAD + k].flatten(1) for k in names], 1)
        torch.testing.assert_close(trackers.sum(0), grads.sum(0), atol=1e-5, rtol=1e-4)
        assert float((trackers - trackers.mean(0)).norm()) < float((grads - grads.mean(0)).norm())
    plain = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.tracking=false"])
    assert sim.msg_bytes > 2 * plain.msg_bytes - 1000


def test_partial_participation_folds_only_the_drawn_nodes_gradients_into_the_trackers(synth_dir, synth_data) -> None:  # noqa: ANN001
    """With ``tracking_fraction`` < 1 the nodes outside a round's seeded draw fold in a zero
    gradient; the draw is a node's own (seed, round, id), and the sum invariant still holds."""
    ids = np.arange(20_000)
    drawn = participation(3, 7, ids, 0.25)
    assert abs(drawn.mean() - 0.25) < 0.02 and (drawn == participation(3, 7, ids, 0.25)).all()
    assert not (drawn == participation(3, 8, ids, 0.25)).all() and participation(3, 7, ids, 1.0).all()
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=ring", "gossip.tracking_fraction=0.5"])
    names = sim.pop.shared_names
    for rnd in range(1, 4):
        sim.step(rnd)
        took = participation(sim.pop.plan.seed, rnd, sim.pop.ids, 0.5)
        assert 0 < took.sum() < len(took)
        grads = torch.cat([sim.pop.state[LAST_GRAD + k].flatten(1) for k in names], 1)
        assert (grads[torch.from_numpy(~took)] == 0).all() and (grads[torch.from_numpy(took)].abs().sum(1) > 0).all()
        trackers = torch.cat([sim.pop.state[TRACKER + k].flatten(1) for k in names], 1)
        torch.testing.assert_close(trackers.sum(0), grads.sum(0), atol=1e-5, rtol=1e-4)


def test_sample_weighting_scales_each_nodes_tracked_gradient_by_its_interaction_count(synth_dir, synth_data) -> None:  # noqa: ANN001
    """``tracking_weight=samples``: a node folds its count times the gradient it would fold
    under ``node`` weighting (same seeds, so the same round-1 gradient), and the trackers then
    sum to the count-weighted gradients, the objective FedAvg's server average optimises. Where
    aggregators weigh by counts (edge hierarchy, FedAvg) the gradients are not weighted again,
    and local-only, which mixes nothing, is left as it was."""
    extra = ["sim.nodes=8", "gossip.topology=ring"]
    plain = _sim(synth_dir, synth_data, extra + ["gossip.tracking_weight=node"])
    weighted = _sim(synth_dir, synth_data, extra + ["gossip.tracking_weight=samples"])
    counts = torch.tensor([sum(len(synth_data.train[u]) for u in node) for node in weighted.nodes],
                          dtype=torch.float32)
    assert counts.unique().numel() > 1
    torch.testing.assert_close(weighted.pop.weights, counts)
    plain.step(1)
    weighted.step(1)
    for k in weighted.pop.shared_names:
        scaled = counts.view(-1, *[1] * (plain.pop.state[LAST_GRAD + k].dim() - 1)) * plain.pop.state[LAST_GRAD + k]
        torch.testing.assert_close(weighted.pop.state[LAST_GRAD + k], scaled, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(weighted.pop.state[TRACKER + k].sum(0), scaled.sum(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tracking_weight"):
        gradient_weights("users", counts.numpy())
    for unweighted in (["gossip.topology=edge-hierarchy:m=2"], ["run.method=fedavg-server"],
                       ["run.method=local-only"]):
        other = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.tracking_weight=samples", *unweighted])
        assert (other.pop.weights == 1).all(), unweighted  # aggregators weigh by counts; local-only mixes nothing


def test_a_lossy_codec_keeps_a_residual_that_keeps_the_tracker_sum_exact(synth_dir, synth_data) -> None:  # noqa: ANN001
    """Under tracking a quantiser's error would add to the trackers' sum every round. With the
    sender's residual the invariant holds exactly in a corrected form: the trackers plus each
    sender's unsent residual, weighted by the share it gives away (1 - W_jj), sum to the latest
    gradients. Without the residual the plain sum drifts, which is what the residual is for."""
    extra = ["sim.nodes=8", "gossip.topology=ring", "gossip.tracking=true", "gossip.codec=int8"]
    sim, bare = _sim(synth_dir, synth_data, extra), _sim(synth_dir, synth_data, extra)
    assert sim.feedback is not None
    bare.feedback = None
    names = sim.pop.shared_names
    for rnd in range(1, 5):
        sim.step(rnd)
        bare.step(rnd)
        gives = 1.0 - torch.from_numpy(sim.plan.round(rnd, sim.faults.round(rnd)).d).to(torch.float32)
        for k in names:
            residual = sim.feedback.residual[TRACK + k]
            corrected = sim.pop.state[TRACKER + k].sum(0) + (gives.view(-1, *[1] * (residual.dim() - 1)) * residual).sum(0)
            torch.testing.assert_close(corrected, sim.pop.state[LAST_GRAD + k].sum(0), atol=1e-5, rtol=1e-4)
    drift = max(float((bare.pop.state[TRACKER + k].sum(0) - bare.pop.state[LAST_GRAD + k].sum(0)).abs().max())
                for k in names)
    assert drift > 1e-3, drift


def test_star_hierarchy_is_fedavg(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=6", "run.method=fedavg-server", "train.local_steps=1"])
    sim.pop.train_round(1)
    before = {k: v.clone() for k, v in sim.pop.shared().items()}
    sim.pop.train_round = lambda *a, **k: 0.0  # the round below only mixes what was trained above
    sim.step(1)
    counts = torch.tensor([float(sum(len(synth_data.train[u]) for u in n)) for n in sim.nodes])
    after = sim.pop.shared()
    for k, v in before.items():  # the shared adapter and, with gradient tracking, its trackers
        expected = (counts.view(-1, *([1] * (v.dim() - 1))) * v).sum(0) / counts.sum()
        assert torch.allclose(after[k], expected.expand_as(v), atol=1e-6), k


def test_edge_hierarchy_clients_of_one_aggregator_agree(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=12", "gossip.topology=edge-hierarchy:m=3",
                                       "train.local_steps=1"])
    sim.step(1)
    homes = sim.plan.home
    for k, v in sim.pop.shared().items():
        for agg in range(3):
            group = v[torch.from_numpy(homes == agg)]
            assert torch.allclose(group, group[:1].expand_as(group), atol=1e-6)


def test_faults_are_seeded_and_down_nodes_do_not_train(synth_dir, synth_data) -> None:  # noqa: ANN001
    extra = ["sim.nodes=10", "sim.churn=0.3", "sim.drop_prob=0.3", "sim.stragglers=0.2", "sim.down=1-2:0"]
    a, b = _sim(synth_dir, synth_data, extra), _sim(synth_dir, synth_data, extra)
    before = {k: v[0].clone() for k, v in a.pop.params.items()}
    for r in (1, 2):
        stats = a.step(r)
        b.step(r)
        # lost messages, dropped ones and those sent to a node that is down were sent, never received
        assert 0 < stats.bytes_received < stats.bytes_sent
    for k, v in a.pop.params.items():
        assert torch.equal(v, b.pop.params[k])
        assert torch.equal(v[0], before[k])


@pytest.mark.slow
def test_sim_cli_writes_the_output_contract(tmp_path: Path, synth_dir: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "3", "--nodes", "10",
            "--topology", "ring", "--out", str(out)] + [a for o in TINY for a in ("--set", o)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "convergence.png", "metrics.jsonl",
                                                     "summary.json"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert set(records[0]) >= {"round", "val", "test", "loss", "consensus_distance", "bytes_sent_total", "wall_s"}
    assert set(records[0]["test"]) == {"sampled", "full"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_round"] == max(records, key=lambda r: r["val"]["sampled"]["ndcg@10"])["round"]
    assert summary["bytes_per_node_per_round"] > 0 and summary["nodes"] == 10
    # every message on a ring without faults reaches a node that is up: received equals sent
    assert summary["bytes_sent_received_per_node_per_round"] == 2 * summary["bytes_per_node_per_round"]
    assert records[-1]["bytes_sent_received_per_node_per_round"] == summary["bytes_sent_received_per_node_per_round"]
    assert load(out / "config.toml").gossip.topology == "ring"


def test_fedavg_with_a_server_exchanges_once_whatever_the_config_says(tmp_path: Path, synth_dir: Path,
                                                                     cache_dir: Path) -> None:
    """One up and one down a round: the config it records says so, and so do its bytes."""
    runs = {}
    for exchanges in (1, 3):
        out = tmp_path / f"x{exchanges}"
        args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "1", "--nodes", "5",
                "--method", "fedavg-server", "--out", str(out), "--set", f"gossip.exchanges={exchanges}"]
        assert main(args + [a for o in TINY for a in ("--set", o)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        runs[exchanges] = summary["bytes_per_node_per_round"]
        assert summary["bytes_sent_received_per_node_per_round"] == 2 * runs[exchanges]  # up and down both arrive
        assert load(out / "config.toml").gossip.exchanges == 1
    assert runs[3] == runs[1] > 0


@pytest.mark.parametrize("flags,needle", [
    (["--topology", "no-such-topology"], "no-such-topology"),
    (["--set", "sim.bogus=1"], "sim.bogus"),
    (["--topology", "/nonexistent/topo.json"], "topo.json"),
])
def test_bad_specs_are_one_line_errors(tmp_path: Path, synth_dir: Path, cache_dir: Path,
                                       capsys: pytest.CaptureFixture, flags: list[str], needle: str) -> None:
    args = ["--dataset", "synthetic", "--data-dir", str(synth_dir), "--rounds", "1", "--nodes", "5",
            "--out", str(tmp_path / "x")] + [a for o in TINY for a in ("--set", o)] + flags
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_a_diverging_run_stops_and_keeps_its_history(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=6", "gossip.topology=ring", "train.shared_optimizer=sgd",
                                       "train.shared_lr=1e30", "eval.every=1"])
    records = sim.run(rounds=5, progress=False)
    assert sim.diverged_at is not None and sim.diverged_at < 5
    assert [r["round"] for r in records] == list(range(1, sim.diverged_at + 1))
    assert records[-1]["test"]["sampled"]["hr@10"] == 0.0  # NaN scores rank last
