"""Backbone, adapters and their isolation; save/load round trip; bad backbone directories."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prec.data.sampler import NegativeSampler
from p2prec.learn.factories import adapter_model
from p2prec.learn.batches import train_batch
from p2prec.learn.local import StepSettings, init_opt_state, local_step
from p2prec.model.adapters import PERSONAL, SHARED
from p2prec.model.backbone import build_backbone
from p2prec.model.store import BackboneError, load_backbone, save_backbone
from p2prec.rng import seeded_rng


def _model(cfg, data, seed: int = 0):  # noqa: ANN001, ANN202
    m = cfg.model
    backbone = build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len,
                              m.dropout, m.causal, seed=seed)
    backbone.requires_grad_(False)
    return backbone.eval(), adapter_model(backbone, cfg)


def _train(model, data, steps: int = 5):  # noqa: ANN001, ANN202
    sampler = NegativeSampler(data)
    params, state = model.trainable_state(), init_opt_state(model.trainable_state())
    for step in range(steps):
        b = train_batch(data, sampler, data.federated_users[:8], 8, 12, 1, seeded_rng(0, step))
        params, state, _ = local_step(model, params, state, b.inputs, b.targets, b.negatives, StepSettings(lr=0.05))
    return params


def test_only_adapters_and_gate_are_trainable(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, model = _model(tiny_cfg, synth_data)
    names = model.trainable_names()
    assert "gate" in names
    assert all(n == "gate" or ".lora_" in n for n in names)
    assert any(f".{PERSONAL}" in n for n in names) and any(f".{SHARED}" in n for n in names)


def test_lora_convention_one_factor_random_one_zero(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, model = _model(tiny_cfg, synth_data)
    state = model.trainable_state()
    for name, t in state.items():
        if ".lora_A." in name:
            assert t.abs().sum() > 0, name
        if ".lora_B." in name:
            assert t.abs().sum() == 0, name
    emb = [n for n in state if "lora_embedding" in n]
    assert any(state[n].abs().sum() > 0 for n in emb) and any(state[n].abs().sum() == 0 for n in emb)


def test_fresh_adapters_are_a_no_op(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    backbone, model = _model(tiny_cfg, synth_data)
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    cands = torch.tensor([[1, 2, 3], [7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(items, cands), backbone(items, cands))


def test_shared_state_holds_only_the_shared_adapter(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, model = _model(tiny_cfg, synth_data)
    shared = model.shared_state()
    assert shared and all(f".{SHARED}" in n for n in shared)
    assert not any(PERSONAL in n or n == "gate" for n in shared)
    counts = model.parameter_counts()
    assert counts["shared"] == sum(t.numel() for t in shared.values())
    assert counts["gate"] == tiny_cfg.model.layers and counts["backbone"] > counts["shared"]


def test_training_changes_adapters_and_never_the_backbone(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, model = _model(tiny_cfg, synth_data)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = model.trainable_state()
    params = _train(model, synth_data)
    model.load_trainable(params)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.detach().numpy().tobytes() == frozen[n].numpy().tobytes(), n
    assert all(not torch.equal(before[n], params[n]) for n in model.shared_names())
    assert not torch.equal(before["gate"], params["gate"])


def test_gate_weighs_the_two_adapters(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, model = _model(tiny_cfg, synth_data)
    model.load_trainable(_train(model, synth_data))
    items = torch.tensor([[0, 1, 2, 3, 4, 5]])
    cands = torch.tensor([[6, 7, 8]])
    with torch.no_grad():
        base = model(items, cands)
        model.gate.fill_(20.0)
        personal_only = model(items, cands)
    assert not torch.allclose(base, personal_only)


def test_load_shared_state_round_trip_and_shape_errors(tiny_cfg, synth_data) -> None:  # noqa: ANN001
    _, a = _model(tiny_cfg, synth_data)
    _, b = _model(tiny_cfg, synth_data, seed=0)
    a.load_trainable(_train(a, synth_data))
    b.load_shared_state(a.shared_state())
    assert all(torch.equal(a.shared_state()[n], t) for n, t in b.shared_state().items())
    bad = a.shared_state()
    name = next(iter(bad))
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        b.load_shared_state(bad)
    with pytest.raises(ValueError, match="missing"):
        b.load_shared_state({})


def _bare(cfg, data):  # noqa: ANN001, ANN202
    m = cfg.model
    return build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=3)


def test_backbone_save_load_is_bit_exact(tmp_path: Path, tiny_cfg, synth_data) -> None:  # noqa: ANN001
    backbone = _bare(tiny_cfg, synth_data)
    save_backbone(backbone, tmp_path / "bb", synth_data.item_ids, {"note": "test"})
    loaded = load_backbone(tmp_path / "bb", synth_data)
    a, b = backbone.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb"]


def test_bad_backbone_directories(tmp_path: Path, tiny_cfg, synth_data) -> None:  # noqa: ANN001
    with pytest.raises(BackboneError, match="missing config.json"):
        load_backbone(tmp_path)
    _, wrapped = _model(tiny_cfg, synth_data)
    with pytest.raises(BackboneError, match="carries LoRA"):
        save_backbone(wrapped.backbone, tmp_path / "wrapped", synth_data.item_ids)
    backbone = _bare(tiny_cfg, synth_data)
    save_backbone(backbone, tmp_path / "bb", synth_data.item_ids)
    other = replace(synth_data, item_ids=synth_data.item_ids + 10_000,
                    titles=[f"Another film {i}" for i in range(len(synth_data.titles))])
    with pytest.raises(BackboneError, match="shares no title"):
        load_backbone(tmp_path / "bb", other)
    (tmp_path / "bb" / "items.json").write_text("{not json")
    with pytest.raises(BackboneError, match="unreadable catalogue"):
        load_backbone(tmp_path / "bb")
