"""The simulator: equivalence with a plain per-node loop, consensus rate, hierarchy, faults, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prec.config import load
from p2prec.data.sampler import NegativeSampler
from p2prec.gossip.mixing import mix, row_normalise
from p2prec.learn.batches import train_batch
from p2prec.learn.baselines import step_settings
from p2prec.learn.local import init_opt_state, local_step
from p2prec.learn.tracking import LAST_GRAD, TRACKER
from p2prec.model.backbone import build_backbone
from p2prec.sim.cli import main
from p2prec.sim.runner import build_topology
from p2prec.sim.engine import Simulation
from p2prec.data.sampler import seeded_rng
from p2prec.topology import metropolis_hastings, predicted_rate
from tests.conftest import TINY


def _sim(synth_dir: Path, synth_data, extra: list[str]) -> Simulation:  # noqa: ANN001
    cfg = load(None, TINY + [f"data.dir={synth_dir}", "train.backbone_dropout=false", "sim.chunk=3"] + extra)
    m = cfg.model
    backbone = build_backbone(synth_data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=2)
    backbone.requires_grad_(False)
    graph = build_topology(cfg, len(synth_data.nodes(cfg.data.users_per_node)[: cfg.sim.nodes or None]))
    return Simulation(cfg, synth_data, backbone, graph)


def test_vectorized_simulator_matches_a_plain_per_node_loop(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=8", "gossip.topology=ring", "train.local_steps=2"])
    model, cfg, pop = sim.model, sim.cfg, sim.pop
    params = [{k: v[i].clone() for k, v in pop.params.items()} for i in range(8)]
    states = [init_opt_state(p) for p in params]
    w = row_normalise(metropolis_hastings(build_topology(cfg, 8)))
    sampler = NegativeSampler(synth_data)
    for rnd in range(1, 4):
        sim.step(rnd)
        for i in range(8):
            for step in range(cfg.train.local_steps):
                b = train_batch(synth_data, sampler, sim.nodes[i], cfg.train.batch_size, cfg.model.max_len,
                                cfg.train.negatives, seeded_rng(cfg.train.seed, rnd, i, step))
                params[i], states[i], _ = local_step(model, params[i], states[i], b.inputs, b.targets,
                                                     b.negatives, step_settings(cfg, pop.shared_names))
        mixed = []
        for i in range(8):
            row = w[i]
            peers = row.indices
            stacked = {k: torch.stack([params[j][k] for j in peers]) for k in pop.shared_names}
            mixed.append(mix(row[:, peers], stacked))
        for i in range(8):
            params[i].update({k: v[0] for k, v in mixed[i].items()})
    for i in range(8):
        for k, v in params[i].items():
            assert torch.allclose(pop.params[k][i], v, atol=1e-5), (i, k)


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
    assert sim.msg_bytes > 2 * _sim(synth_dir, synth_data, ["sim.nodes=8"]).msg_bytes - 1000


def test_star_hierarchy_is_fedavg(synth_dir, synth_data) -> None:  # noqa: ANN001
    sim = _sim(synth_dir, synth_data, ["sim.nodes=6", "sim.baseline=fedavg-server", "train.local_steps=1"])
    sim.pop.train_round(1)
    before = {k: v.clone() for k, v in sim.pop.shared().items()}
    sim.pop.train_round = lambda *a, **k: 0.0  # the round below only mixes what was trained above
    sim.step(1)
    counts = torch.tensor([float(sum(len(synth_data.train[u]) for u in n)) for n in sim.nodes])
    for k, v in before.items():
        expected = (counts.view(-1, *([1] * (v.dim() - 1))) * v).sum(0) / counts.sum()
        assert torch.allclose(sim.pop.params[k], expected.expand_as(v), atol=1e-6)


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
        a.step(r)
        b.step(r)
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
    assert load(out / "config.toml").gossip.topology == "ring"


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
