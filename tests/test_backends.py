"""The sharded simulator, in this process and on Ray, against the in-process simulator."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from p2prec.config import load
from p2prec.model.backbone import build_backbone
from p2prec.sim.backend import make_simulation
from p2prec.sim.runner import build_topology
from p2prec.sim.sharded import LocalPool, ShardedSimulation
from p2prec.sim.shard import shard_bounds
from tests.conftest import TINY

# Exact agreement needs the same dropout masks, which depend on who shares a chunk (see p2prec.sim.shard).
SETTINGS = ["sim.nodes=8", "train.backbone_dropout=false", "gossip.exchanges=2", "gossip.topology=small-world:k=4",
            "eval.protocols=sampled"]


def _setup(synth_dir: Path, synth_data, extra: list[str]):  # noqa: ANN001, ANN202
    cfg = load(None, TINY + [f"data.dir={synth_dir}", *SETTINGS, *extra])
    m = cfg.model
    backbone = build_backbone(synth_data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=2)
    backbone.requires_grad_(False)
    return cfg, backbone, build_topology(cfg, 8)


def _run(cfg, synth_data, backbone, graph, rounds: int = 3):  # noqa: ANN001, ANN202
    sim = make_simulation(cfg, synth_data, copy.deepcopy(backbone), graph)
    try:
        stats = [sim.step(r) for r in range(1, rounds + 1)]
        params = sim.params() if isinstance(sim, ShardedSimulation) else sim.pop.params
        return {k: v.clone() for k, v in params.items()}, stats, sim.evaluate(), sim.bound_counts()
    finally:
        sim.close()


def _agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, worst


def test_shards_in_this_process_match_the_simulator_under_faults(synth_dir, synth_data) -> None:  # noqa: ANN001
    # A norm bound this tight drops some honest messages: the shards must drop and cut the same ones.
    faults = ["sim.drop_prob=0.3", "sim.churn=0.2", "sim.stragglers=0.2", "sim.straggler_mode=lost",
              "robust.norm_bound=1.0001"]
    cfg, backbone, graph = _setup(synth_dir, synth_data, faults)
    reference, ref_stats, ref_eval, ref_bound = _run(cfg, synth_data, backbone, graph)
    cfg.sim.backend, cfg.sim.shards = "shards", 3
    sharded, stats, evaluation, bound = _run(cfg, synth_data, backbone, graph)
    _agree(sharded, reference, 1e-5)
    assert bound == ref_bound and bound[0] > 0   # (messages dropped, links cut)
    assert [s.messages for s in stats] == [s.messages for s in ref_stats]
    assert [s.consensus for s in stats] == pytest.approx([s.consensus for s in ref_stats], rel=1e-4)
    assert evaluation["test"]["sampled"]["ndcg@10"] == pytest.approx(ref_eval["test"]["sampled"]["ndcg@10"], abs=1e-6)


def test_a_neighbour_in_another_shard_is_the_only_state_that_travels(synth_dir, synth_data) -> None:  # noqa: ANN001
    cfg, backbone, graph = _setup(synth_dir, synth_data, [])
    pool = LocalPool(cfg, synth_data, copy.deepcopy(backbone), graph, 2)
    for shard in pool.members:
        shard.train(1)
    out = [s.outbox(1, 0) for s in pool.members]
    for u, packets in enumerate(out):
        assert packets[u] is None
        start, stop = shard_bounds(8, 2)[u]
        for t, packet in enumerate(packets):
            if packet is None:
                continue
            lo, hi = shard_bounds(8, 2)[t]
            wanted = {j for i in range(lo, hi) for j in graph.neighbors(i) if start <= j < stop}
            assert set(packet.rows.tolist()) == wanted


def test_unsupported_settings_are_one_line_errors(synth_dir, synth_data) -> None:  # noqa: ANN001
    cfg, backbone, graph = _setup(synth_dir, synth_data, ["sim.backend=shards", "gossip.codec=int8"])
    with pytest.raises(ValueError, match="gossip.codec: 'none' only; use sim.backend = 'local'"):
        make_simulation(cfg, synth_data, backbone, graph)
    with pytest.raises(ValueError, match="need 1 to 8 shards"):
        shard_bounds(8, 9)


def test_a_missing_ray_names_the_extra(synth_dir, synth_data, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg, backbone, graph = _setup(synth_dir, synth_data, ["sim.backend=ray"])
    with pytest.raises(ValueError, match=r"pip install 'p2prec\[ray\]'"):
        make_simulation(cfg, synth_data, backbone, graph)


def test_ray_with_two_shards_matches_the_simulator(synth_dir, synth_data) -> None:  # noqa: ANN001
    ray = pytest.importorskip("ray")
    cfg, backbone, graph = _setup(synth_dir, synth_data, [])
    reference, ref_stats, ref_eval, _ = _run(cfg, synth_data, backbone, graph)
    cfg.sim.backend, cfg.sim.shards = "ray", 2
    on_ray, stats, evaluation, _ = _run(cfg, synth_data, backbone, graph)
    assert not ray.is_initialized()  # the local instance stopped with the simulation
    _agree(on_ray, reference, 1e-5)
    assert [s.messages for s in stats] == [s.messages for s in ref_stats]
    assert evaluation["val"]["sampled"]["ndcg@10"] == pytest.approx(ref_eval["val"]["sampled"]["ndcg@10"], abs=1e-6)
