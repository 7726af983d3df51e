"""The simulator's trust plumbing: codec bytes and decoded messages, local DP, attacks, robust rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prec.config import Config, load
from p2prec.gossip.codecs import get_codec
from p2prec.gossip.mixing import flatten, mix
from p2prec.gossip.privacy import epsilon, update_norms
from p2prec.learn.factories import adapter_model
from p2prec.learn.population import gossip_template
from p2prec.model.backbone import build_backbone
from p2prec.sim.engine import Simulation, message_bytes
from p2prec.sim.report import epsilon_plot, trust_table
from p2prec.sim.runner import run_simulation
from p2prec.wire import Message, MessageType, encode
from tests.conftest import TINY
from tests.node_support import make_backbone
from tests.test_sim import _sim


def _frozen_training(sim: Simulation) -> dict[str, torch.Tensor]:
    """Train round 1, then stub training out, so the next ``step`` only mixes: return the trained shared state."""
    sim.pop.train_round(1)
    sim.pop.train_round = lambda *a, **k: 0.0
    return {k: v.clone() for k, v in sim.pop.shared().items()}


def _shared_distance(a: Simulation, b: Simulation, rows: torch.Tensor) -> float:
    names = a.pop.shared_names
    return float((flatten(a.pop.shared(), names)[rows] - flatten(b.pop.shared(), names)[rows]).norm())


def test_int8_messages_are_over_3_5x_smaller_than_fp32_at_the_real_adapter_size() -> None:
    cfg = Config()  # the ML-100K model: 1,682 items, hidden 64, two layers, shared rank 8
    m = cfg.model
    backbone = build_backbone(1682, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=0)
    shared = adapter_model(backbone, cfg).shared_state()
    sizes = {}
    for name in ("none", "fp16", "int8", "topk+int8"):
        codec = get_codec(name)
        frames = encode(Message(MessageType.GOSSIP, 0, 0, codec.name, codec.encode(shared), {}))
        sizes[name] = message_bytes(shared, codec)
        assert sizes[name] == sum(len(memoryview(f).cast("B")) for f in frames)
    assert sizes["none"] / sizes["int8"] >= 3.5
    assert sizes["none"] > sizes["fp16"] > sizes["int8"] > sizes["topk+int8"]


def test_neighbours_mix_the_decoded_message_and_bytes_count_each_message(synth_dir, synth_data) -> None:  # noqa: ANN001
    sims = {name: _sim(synth_dir, synth_data, ["sim.nodes=10", "gossip.topology=ring", f"gossip.codec={name}"])
            for name in ("none", "int8")}
    for name, sim in sims.items():
        own = _frozen_training(sim)
        stats = sim.step(2)
        mixing = sim.plan.round(2, sim.faults.round(2))
        received = get_codec(name).roundtrip(own)
        expected = mix(mixing.a, received)
        after = sim.pop.shared()
        for k, v in own.items():
            assert torch.allclose(after[k], expected[k] + torch.from_numpy(mixing.d).float().view(
                -1, *[1] * (v.dim() - 1)) * v, atol=1e-6), (name, k)
        template = gossip_template(sim.model, sim.cfg.gossip.tracking)
        assert stats.bytes_sent == stats.messages * message_bytes(template, get_codec(name))
    assert sims["int8"].msg_bytes < sims["none"].msg_bytes


def test_a_complete_graph_mixes_as_a_rank_one_average_with_the_true_own_term(synth_dir, synth_data) -> None:  # noqa: ANN001
    """The fast path for a uniform average equals the dense ``(J - I)/n @ received + own/n``."""
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=complete", "gossip.codec=int8"])
    own = _frozen_training(sim)
    sim.step(2)
    mixing = sim.plan.round(2, sim.faults.round(2))
    assert mixing.echo is not None and len(mixing.factors) == 2
    np.testing.assert_allclose(mixing.a.toarray(), (np.ones((8, 8)) - np.eye(8)) / 8, atol=1e-12)
    received = get_codec("int8").roundtrip(own)
    after = sim.pop.shared()
    for k, v in own.items():
        expected = received[k].mean(0, keepdim=True) + (v - received[k]) / 8
        assert torch.allclose(after[k], expected, atol=1e-6), k


def test_topk_error_feedback_moves_only_for_nodes_that_send(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=ring", "gossip.codec=topk",
                                       "gossip.topk_fraction=0.2", "sim.down=1-2:3"])
    for r in (1, 2):
        sim.step(r)
    residual = flatten(sim.feedback.residual, sorted(sim.feedback.residual))
    assert torch.count_nonzero(residual[3]) == 0
    assert bool((residual.norm(dim=1)[torch.arange(8) != 3] > 0).all())


def test_the_default_round_is_exactly_plain_mixing(synth_dir, synth_data) -> None:  # noqa: ANN001
    extra = ["sim.nodes=10", "sim.drop_prob=0.3", "sim.churn=0.2"]
    sim, plain = _sim(synth_dir, synth_data, extra), _sim(synth_dir, synth_data, extra)
    for r in (1, 2, 3):
        sim.step(r)
        faults = plain.faults.round(r)
        plain.pop.train_round(r, active=~faults.down)
        own = plain.pop.shared()
        mixing = plain.plan.round(r, faults)
        mixed = mix(mixing.a, own)
        d = torch.from_numpy(mixing.d).to(torch.float32)
        for k, v in list(own.items()):
            v.copy_(mixed[k] + d.view(-1, *[1] * (v.dim() - 1)) * v)
    for k, v in plain.pop.params.items():
        assert torch.equal(sim.pop.params[k], v), k


def test_a_robust_rule_mixes_the_true_own_state_not_its_decoded_copy(synth_dir, synth_data) -> None:  # noqa: ANN001
    """ClippedGossip with an unreachable radius is the mean; it must match the fast mean path,
    own term included, under a lossy codec."""
    extra = ["sim.nodes=10", "gossip.topology=small-world:k=4,p=0.2", "gossip.codec=int8", "sim.drop_prob=0.2"]
    fast = _sim(synth_dir, synth_data, extra)
    robust = _sim(synth_dir, synth_data, extra + ["robust.rule=clipped", "robust.tau=1e9"])
    for r in (1, 2):
        fast.step(r)
        robust.step(r)
    mixed = robust.pop.shared()
    for k, v in fast.pop.shared().items():  # trackers of count-weighted gradients reach ~10: a relative bound
        assert torch.allclose(mixed[k], v, atol=1e-6 * max(1.0, float(v.abs().max()))), k


def test_private_update_is_clipped_then_noised_and_the_node_keeps_what_it_released(  # noqa: ANN001
        synth_dir, synth_data) -> None:
    base = ["sim.nodes=6", "run.method=local-only", "train.shared_optimizer=sgd", "train.shared_lr=0.5"]
    plain = _sim(synth_dir, synth_data, base)
    clipped = _sim(synth_dir, synth_data, base + ["privacy.enabled=true", "privacy.clip=0.01",
                                                  "privacy.noise_multiplier=0"])
    noisy = _sim(synth_dir, synth_data, base + ["privacy.enabled=true", "privacy.clip=0.01",
                                                "privacy.noise_multiplier=2"])
    start = {k: v.clone() for k, v in plain.pop.shared().items()}
    for sim in (plain, clipped, noisy):
        sim.step(1)
    raw = {k: plain.pop.shared()[k] - v for k, v in start.items()}
    assert bool((update_norms(raw, stacked=True) > 0.01).all())  # the clip bites on every node
    kept = {k: clipped.pop.shared()[k] - v for k, v in start.items()}
    assert torch.allclose(update_norms(kept, stacked=True), torch.full((6,), 0.01), rtol=1e-4)
    scale = (0.01 / update_norms(raw, stacked=True)).view(-1, 1)
    names = sorted(start)
    assert torch.allclose(flatten(kept, names), flatten(raw, names) * scale, atol=1e-7)
    noise = flatten({k: noisy.pop.shared()[k] - clipped.pop.shared()[k] for k in start}, names)
    assert float(noise.std()) == pytest.approx(2 * 0.01, rel=0.05)
    assert torch.equal(noisy.stack.privacy.reference[names[0]], start[names[0]])  # the round's update was measured from its start


def test_epsilon_is_reported_each_evaluated_round_and_grows(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=6", "gossip.topology=ring", "privacy.enabled=true",
                                       "privacy.noise_multiplier=3", "privacy.clip=1", "run.rounds=3"])
    records = sim.run(progress=False)
    eps = [r["epsilon"] for r in records]
    assert eps == [pytest.approx(epsilon(3.0, r, 1e-5)) for r in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    summary = sim.trust_summary()
    assert summary["epsilon"] == eps[-1] and summary["delta"] == 1e-5 and summary["noise_multiplier"] == 3.0
    assert _sim(synth_dir, synth_data, ["sim.nodes=6", "gossip.topology=ring"]).trust_summary()["epsilon"] is None


def test_the_run_folder_carries_epsilon_bytes_and_the_trust_settings(tmp_path: Path, synth_dir: Path,  # noqa: ANN001
                                                                      synth_data) -> None:
    overrides = TINY + [f"data.dir={synth_dir}", "sim.nodes=6", "run.rounds=3", "gossip.topology=ring",
                        "gossip.codec=int8", "privacy.enabled=true", "privacy.noise_multiplier=2",
                        "sim.byzantine=1", "sim.attack=noise", "robust.rule=median"]
    cfg = load(None, overrides)
    backbone = make_backbone(synth_data, cfg, tmp_path / "backbone")
    run_simulation(cfg, synth_data, tmp_path / "run", str(backbone), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["epsilon"] for r in records] == [pytest.approx(epsilon(2.0, r, 1e-5)) for r in (1, 2, 3)]
    assert summary["epsilon"] == records[-1]["epsilon"] and summary["noise_multiplier"] == 2.0
    m = cfg.model
    shared = gossip_template(adapter_model(build_backbone(synth_data.n_items, m.hidden, m.layers, m.heads,
                                                          m.intermediate, m.max_len), cfg), cfg.gossip.tracking)
    assert summary["codec"] == "int8" and summary["message_bytes"] == message_bytes(shared, get_codec("int8"))
    assert summary["bytes_per_node_per_round"] == 2 * summary["message_bytes"]  # a ring: two messages a node
    assert (summary["byzantine"], summary["evaluated_nodes"], summary["robust_rule"]) == (1, 5, "median")
    table = trust_table([tmp_path / "run"], "sampled")
    assert table is not None and "| int8 |" in table and "1 noise" in table
    epsilon_plot([tmp_path / "run"], tmp_path / "dp.png", "sampled")
    assert (tmp_path / "dp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean = load(None, overrides + ["privacy.enabled=false"])
    run_simulation(clean, synth_data, tmp_path / "clean", str(backbone), progress=False)
    with pytest.raises(ValueError, match="none of these runs has privacy on"):
        epsilon_plot([tmp_path / "clean"], tmp_path / "none.png", "sampled")


def test_a_target_epsilon_sets_the_noise_for_the_planned_rounds(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=4", "gossip.topology=ring", "privacy.enabled=true",
                                       "privacy.target_epsilon=4", "run.rounds=20", "run.train_rounds=10"])
    sigma = sim.stack.privacy.sigma
    assert epsilon(sigma, 10, 1e-5) <= 4.0 < epsilon(sigma * 0.99, 10, 1e-5)
    for r in range(1, 13):
        sim.step(r)
    assert sim.stack.privacy.releases == 10  # rounds without training release nothing
    assert sim.epsilon() == pytest.approx(epsilon(sigma, 10, 1e-5)) and math.isfinite(sim.epsilon())


def test_sign_flip_attackers_wreck_the_mean_and_not_the_median(synth_dir, synth_data) -> None:  # noqa: ANN001
    """Two of ten nodes on a complete graph send -10x their state. Sign flips alternate the
    honest states' sign from round to round, so the test compares the largest gap over rounds."""
    base = ["sim.nodes=10", "gossip.topology=complete", "robust.norm_bound=0"]  # the rules alone, unbounded
    attack = ["sim.byzantine=2", "sim.attack=sign-flip", "sim.attack_scale=10"]
    clean = _sim(synth_dir, synth_data, base)
    mean = _sim(synth_dir, synth_data, base + attack)
    median = _sim(synth_dir, synth_data, base + attack + ["robust.rule=median"])
    median_clean = _sim(synth_dir, synth_data, base + ["robust.rule=median"])
    honest = mean.honest
    assert len(honest) == 8 and torch.equal(median.honest, honest)
    assert mean.eval_set.users.shape[0] == 8 and mean.trust_summary()["byzantine"] == 2
    gaps_mean, gaps_median = [], []
    for r in (1, 2):
        for sim in (clean, mean, median, median_clean):
            sim.step(r)
        gaps_mean.append(_shared_distance(mean, clean, honest))
        gaps_median.append(_shared_distance(median, median_clean, honest))
    size = float(flatten(clean.pop.shared(), clean.pop.shared_names)[honest].norm())
    assert max(gaps_mean) > size > 10 * max(gaps_median)
    assert max(gaps_mean) > 100 * max(gaps_median)


def test_a_robust_rule_is_refused_in_an_edge_hierarchy(synth_dir, synth_data) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="robust.rule"):
        _sim(synth_dir, synth_data, ["sim.nodes=12", "gossip.topology=edge-hierarchy:m=3", "robust.rule=median"])


def test_the_default_norm_bound_stops_an_outrageous_constant_in_the_simulator(synth_dir, synth_data) -> None:  # noqa: ANN001
    """One of six nodes on a ring sends states filled with 50.0: with the default norm bound
    every honest node drops it (each receiver renormalises over the rest) and stays near the
    clean run; with the bound off it wrecks its neighbours."""
    base = ["sim.nodes=6", "gossip.topology=ring"]
    attack = ["sim.byzantine=1", "sim.attack=constant", "sim.attack_scale=50"]
    clean = _sim(synth_dir, synth_data, base)
    bounded = _sim(synth_dir, synth_data, base + attack)
    unbounded = _sim(synth_dir, synth_data, base + attack + ["robust.norm_bound=0"])
    honest = bounded.honest
    for r in (1, 2):
        for sim in (clean, bounded, unbounded):
            sim.step(r)
    size = float(flatten(clean.pop.shared(), clean.pop.shared_names)[honest].norm())
    assert _shared_distance(unbounded, clean, honest) > size
    assert _shared_distance(bounded, clean, honest) < 0.2 * size
