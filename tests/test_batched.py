"""The hand-batched forward equals the per-node ``functional_call`` path; its dropout keeps the rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2prec.data.sampler import NegativeSampler
from p2prec.learn.batched import BatchedAdapterModel, dropout
from p2prec.learn.batches import train_batch
from p2prec.learn.local import StepSettings, local_grads
from p2prec.learn.population import LocalPlan, Population, TrackingPlan
from p2prec.model.adapters import DualAdapterModel
from p2prec.model.backbone import build_backbone
from p2prec.rng import seeded_rng
from torch.func import functional_call

ATTENTION = ("query", "value")


def _model(data, personal: tuple[str, ...], shared: tuple[str, ...], text: bool = False) -> DualAdapterModel:  # noqa: ANN001
    """A small backbone; with ``text``, a text path over random 24-d item texts (and no id path
    when no adapter targets ``item_emb``)."""
    texts = torch.randn(data.n_items + 1, 24, generator=torch.Generator().manual_seed(9)) if text else None
    ids = not text or "item_emb" in personal + shared
    backbone = build_backbone(data.n_items, hidden=16, layers=2, heads=2, intermediate=32, max_len=10, seed=4,
                              text=texts, id_embedding=ids)
    backbone.requires_grad_(False)
    return DualAdapterModel(backbone, rank_personal=3, rank_shared=4, alpha_personal=6.0, alpha_shared=8.0,
                            targets_personal=personal, targets_shared=shared).eval()


def _random_params(model: DualAdapterModel, n: int) -> dict[str, torch.Tensor]:
    """Every trainable tensor random and non-zero (peft starts lora_B at zero), the gate away from 0."""
    g = torch.Generator().manual_seed(0)
    return {k: 0.3 * torch.randn((n, *v.shape), generator=g) for k, v in model.trainable_state().items()}


def _batches(data, n: int, negatives: int = 3):  # noqa: ANN001, ANN202
    sampler = NegativeSampler(data)
    nodes = data.nodes(1)[:n]
    parts = [train_batch(data, sampler, nodes[i], 2, 10, negatives, seeded_rng(5, i)) for i in range(n)]
    return tuple(torch.stack([getattr(b, f) for b in parts]) for f in ("inputs", "targets", "negatives"))


@pytest.mark.parametrize(("personal", "shared", "text"), [
    (ATTENTION + ("item_emb",), ATTENTION + ("item_emb",), False),
    (ATTENTION, ATTENTION + ("item_emb",), False),
    (("key", "dense"), ("query", "item_emb"), False),
    (ATTENTION + ("item_proj",), ATTENTION + ("item_emb", "item_proj"), True),
    (ATTENTION, ("query", "dense", "item_proj"), True),
])
@pytest.mark.parametrize("kind", ["bce", "ce"])
def test_scores_and_gradients_equal_per_node_functional_call(synth_data, personal, shared, text, kind) -> None:  # noqa: ANN001
    model = _model(synth_data, personal, shared, text)
    n = 4
    params = _random_params(model, n)
    inputs, targets, negatives = _batches(synth_data, n)
    assert (inputs == 0).any() and (inputs != 0).any()
    batched = BatchedAdapterModel(model)
    candidates = torch.cat([targets.unsqueeze(-1), negatives], dim=-1)
    with torch.no_grad():
        scores = batched.scores(params, inputs, candidates)
    grads, losses = batched.loss_and_grads(params, inputs, targets, negatives, kind)
    for i in range(n):
        own = {k: v[i] for k, v in params.items()}
        with torch.no_grad():
            expected = functional_call(model, own, (inputs[i], candidates[i]))
        torch.testing.assert_close(scores[i], expected, atol=1e-5, rtol=0)
        expected_grads, loss = local_grads(model, own, inputs[i], targets[i], negatives[i], kind)
        assert abs(float(losses[i] - loss)) < 1e-5
        for name, g in expected_grads.items():
            torch.testing.assert_close(grads[name][i], g, atol=1e-5, rtol=0, msg=name)
    assert grads["gate"].abs().min() > 0


@pytest.mark.parametrize("tracking,optimizer", [(False, "sgd"), (True, "adam")])
def test_vectorized_population_matches_per_node_loop_8_nodes_3_rounds(synth_data, tracking: bool,  # noqa: ANN001
                                                                      optimizer: str) -> None:
    """Both adapters everywhere they can go, a shared optimizer of its own, and one node down
    in round 1 (so a chunk is gathered by index rather than sliced); with gradient tracking
    too, whose shared step runs once per round on the mean of the local gradients (with Adam,
    so that the LoRA A factors, whose gradients stay tiny while B grows from zero, visibly move)."""
    def population() -> Population:
        model = _model(synth_data, ATTENTION + ("item_emb",), ATTENTION + ("item_emb", "dense"))
        settings = StepSettings(lr=0.01, shared_names=frozenset(model.shared_names()), shared_lr=0.05,
                                shared_optimizer=optimizer, momentum=0.9)
        plan = LocalPlan(steps=2, batch_size=2, max_len=10, negatives=3, seed=3, chunk=3)
        return Population(model, synth_data, synth_data.nodes(1)[:8], settings, plan, TrackingPlan(tracking))
    vec, loop = population(), population()
    for rnd in range(3):
        active = np.ones(8, dtype=bool)
        active[4] = rnd != 1
        assert vec.train_round(rnd, active, vectorized=True) == pytest.approx(
            loop.train_round(rnd, active, vectorized=False), abs=1e-5)
    for name in vec.params:
        torch.testing.assert_close(vec.params[name], loop.params[name], atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(vec.params[name], vec.model.trainable_state()[name].expand_as(vec.params[name])), name
    for name in vec.state:
        torch.testing.assert_close(vec.state[name], loop.state[name], atol=1e-5, rtol=1e-5, msg=name)
    assert vec.state["t"].tolist() == [6.0] * 4 + [4.0] + [6.0] * 3
    if tracking:
        assert vec.state["t.shared"].tolist() == [3.0] * 4 + [2.0] + [3.0] * 3
        assert set(vec.shared()) == {*vec.shared_names, *("track." + k for k in vec.shared_names)}


def test_dropout_keeps_the_rate_and_the_expectation() -> None:
    layer = torch.nn.Dropout(0.35)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    out = dropout(layer.train(), x)
    assert (out == 0).float().mean().item() == pytest.approx(0.35, abs=5e-3)
    assert out.mean().item() == pytest.approx(1.0, abs=1e-2)
    assert torch.equal(dropout(layer.eval(), x), x)
    assert torch.equal(dropout(torch.nn.Identity(), x), x)


def test_lora_on_a_module_the_forward_does_not_route_is_refused(synth_data) -> None:  # noqa: ANN001
    model = _model(synth_data, ATTENTION, ("position_embeddings",))
    with pytest.raises(ValueError, match="position_embeddings"):
        BatchedAdapterModel(model)
