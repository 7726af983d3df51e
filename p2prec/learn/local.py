"""A node's local update, written once as pure functions of (parameters, optimizer state, batch).

Why functional: the real node calls :func:`local_step` on one node's tensors, and the
simulator runs :func:`adam_step` once on a chunk of nodes' tensors stacked ``[N, ...]``
(its gradients come from :mod:`p2prec.learn.batched`, with the same :func:`ranking_loss`).
Adam is elementwise, so it is written here too rather than taken from ``torch.optim``,
whose stateful objects hold one model's tensors. With ``train.backbone_dropout`` off, a
local update is a deterministic function of its inputs: that is what lets the simulator,
a per-node loop and a real node agree to 1e-5 (with it on, each path draws its own masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    """Hyper-parameters of one local step on a sampled-negative ranking loss.

    Tensors named in ``shared_names`` (the shared adapter) take their own learning rate
    ``shared_lr`` and optimizer ``shared_optimizer``: Adam, or SGD with heavy-ball
    ``momentum``. Why separate: the shared adapter is averaged across nodes after every
    round, which cancels the noise of single-user gradients, so it can take much larger
    steps than the personal adapter, which sees one user's history only and overfits it
    at the same rate. Empty ``shared_names`` means one Adam for everything at ``lr``.
    """

    lr: float = 5e-3
    loss: str = "bce"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    shared_names: frozenset[str] = frozenset()
    shared_lr: float = 0.0
    shared_optimizer: str = "adam"
    momentum: float = 0.0


def init_opt_state(params: Params, batch_dims: int = 0) -> Params:
    """Adam moments (``m.*``, ``v.*``) and step count ``t``; ``batch_dims`` leading node dims."""
    state = {f"m.{k}": torch.zeros_like(v) for k, v in params.items()}
    state.update({f"v.{k}": torch.zeros_like(v) for k, v in params.items()})
    some = next(iter(params.values()))
    state["t"] = torch.zeros(some.shape[:batch_dims], dtype=some.dtype)
    return state


def ranking_loss(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE (positive vs. each negative), BPR, or sampled softmax cross-entropy ("ce").

    Averaged over positions where ``mask`` is 1. "ce" treats the positive and its
    negatives as one softmax; with many negatives it is the strongest of the three for
    next-item ranking (it approximates the full softmax that the full protocol ranks by).
    """
    if kind == "bce":
        per = -F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)
    elif kind == "ce":
        per = -torch.log_softmax(torch.cat([pos.unsqueeze(-1), neg], dim=-1), dim=-1)[..., 0]
    else:
        per = -F.logsigmoid(pos.unsqueeze(-1) - neg).mean(-1)
    return (per * mask).sum() / mask.sum().clamp(min=1.0)


def batch_loss(model: nn.Module, params: Params, inputs: torch.Tensor, targets: torch.Tensor,
               negatives: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss of one node's batch with ``params`` substituted for the model's trainable tensors."""
    candidates = torch.cat([targets.unsqueeze(-1), negatives], dim=-1)
    scores = functional_call(model, params, (inputs, candidates))
    mask = (targets != 0).to(scores.dtype)
    return ranking_loss(scores[..., 0], scores[..., 1:], mask, kind)


def _per_node(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-node quantity (shape ``[]`` or ``[N]``) against a tensor ``[N, ...]``."""
    return x.reshape(*x.shape, *([1] * (like.dim() - x.dim())))


def adam_step(params: Params, grads: Params, state: Params, s: StepSettings) -> tuple[Params, Params]:
    """One decoupled-weight-decay Adam step (AdamW; plain Adam when weight_decay is 0).

    Shared tensors (``s.shared_names``) step at ``s.shared_lr``; with
    ``s.shared_optimizer == "sgd"`` they take a momentum-SGD step instead, reusing the
    ``m.*`` slot as the momentum buffer (their ``v.*`` slot stays zero).
    """
    t = state["t"] + 1
    bias1 = 1 - s.beta1 ** t
    bias2 = 1 - s.beta2 ** t
    new_params: Params = {}
    new_state: Params = {"t": t}
    for name, p in params.items():
        g = grads[name]
        shared = name in s.shared_names
        lr = s.shared_lr if shared else s.lr
        if shared and s.shared_optimizer == "sgd":
            buf = state[f"m.{name}"] * s.momentum + g
            new_params[name] = p - lr * buf
            new_state[f"m.{name}"] = buf
            new_state[f"v.{name}"] = state[f"v.{name}"]
            continue
        m = torch.lerp(state[f"m.{name}"], g, 1 - s.beta1)
        v = torch.addcmul(state[f"v.{name}"] * s.beta2, g, g, value=1 - s.beta2)
        denom = (v / _per_node(bias2, v)).sqrt_().add_(s.eps)
        decayed = p * (1 - lr * s.weight_decay) if s.weight_decay else p
        new_params[name] = decayed - _per_node(lr / bias1, p) * m / denom
        new_state[f"m.{name}"] = m
        new_state[f"v.{name}"] = v
    return new_params, new_state


def local_grads(model: nn.Module, params: Params, inputs: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor, kind: str) -> tuple[Params, torch.Tensor]:
    """Gradient of one node's batch loss with respect to its trainable tensors, and the loss."""
    return grad_and_value(lambda p: batch_loss(model, p, inputs, targets, negatives, kind))(params)


def local_step(model: nn.Module, params: Params, state: Params, inputs: torch.Tensor,
               targets: torch.Tensor, negatives: torch.Tensor,
               s: StepSettings) -> tuple[Params, Params, torch.Tensor]:
    """Gradient of the batch loss, then one Adam step. Returns new params, state and the loss."""
    grads, loss = local_grads(model, params, inputs, targets, negatives, s.loss)
    new_params, new_state = adam_step(params, grads, state, s)
    return new_params, new_state, loss
