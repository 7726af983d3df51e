"""The local update: vectorized and per-node paths agree, and training reduces the loss."""

from __future__ import annotations

import numpy as np
import torch

from p2prec.learn.factories import adapter_model, step_settings
from p2prec.learn.population import LocalPlan, Population
from p2prec.learn.schedule import lr_factor, scaled
from p2prec.model.backbone import build_backbone


def _population(cfg, data, steps: int = 2, **schedule) -> Population:  # noqa: ANN001
    m = cfg.model
    backbone = build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=1)
    backbone.requires_grad_(False)
    model = adapter_model(backbone, cfg)
    nodes = data.nodes(2)[:8]
    plan = LocalPlan(steps=steps, batch_size=2, max_len=m.max_len, negatives=2, seed=3, chunk=3, **schedule)
    return Population(model, data, nodes, step_settings(cfg), plan)


def test_vectorized_local_update_matches_per_node_loop(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    vec, loop = _population(tiny_cfg, synth_data), _population(tiny_cfg, synth_data)
    for rnd in range(3):
        lv = vec.train_round(rnd, vectorized=True)
        ll = loop.train_round(rnd, vectorized=False)
        assert abs(lv - ll) < 1e-5
    for name in vec.params:
        assert torch.allclose(vec.params[name], loop.params[name], atol=1e-5), name
    assert torch.equal(vec.state["t"], torch.full((8,), 6.0))


def test_down_nodes_keep_their_state(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    pop = _population(tiny_cfg, synth_data)
    before = {k: v.clone() for k, v in pop.params.items()}
    active = np.zeros(pop.size, dtype=bool)
    active[::2] = True
    pop.train_round(0, active=active)
    for name, t in pop.params.items():
        assert torch.equal(t[1::2], before[name][1::2])
    assert pop.state["t"].tolist() == [2.0, 0.0] * 4


def test_local_training_reduces_loss(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    pop = _population(tiny_cfg, synth_data, steps=1)
    losses = [pop.train_round(r) for r in range(40)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_cosine_schedule_steps_as_constant_lr_scaled_by_its_factor(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    """Round 3 of 4 under cosine decay is exactly a constant-schedule step at the scaled rates,
    for both the vectorized and the per-node path."""
    factor = lr_factor("cosine", 3, 4)
    assert 0.0 < factor < 1.0
    for vectorized in (True, False):
        cosine = _population(tiny_cfg, synth_data, lr_schedule="cosine", rounds=4)
        manual = _population(tiny_cfg, synth_data)
        manual.settings = scaled(manual.settings, factor)
        cosine.train_round(3, vectorized=vectorized)
        manual.train_round(3, vectorized=vectorized)
        for name in cosine.params:
            assert torch.equal(cosine.params[name], manual.params[name]), name
        untouched = _population(tiny_cfg, synth_data)
        untouched.train_round(3, vectorized=vectorized)
        assert any(not torch.equal(cosine.params[k], untouched.params[k]) for k in cosine.params)
