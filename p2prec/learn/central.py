"""Training on pooled users (one set of parameters), with best-validation selection.

Used twice, with the same local-step math as every node: pre-training the backbone on the
public users (all backbone weights trainable, dropout on) and the centralized baseline
(adapters trainable on the pooled federated users, backbone frozen). Selection is by
validation score only; the test score is read at the best-validation epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.batches import train_batch
from p2prec.learn.local import Params, StepSettings, init_opt_state, local_step
from p2prec.rng import seeded_rng


@dataclass
class PooledRun:
    """The outcome of pooled training: best parameters and the per-epoch history."""

    best_params: Params
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)


def train_pooled(model: nn.Module, params: Params, data: Dataset, sampler: NegativeSampler,
                 users: np.ndarray, settings: StepSettings, *, epochs: int, batch_size: int,
                 max_len: int, negatives: int, seed: int,
                 validate: Callable[[Params, int], tuple[float, dict]], eval_every: int = 1,
                 patience: int = 0, dropout: bool = True, desc: str = "train") -> PooledRun:
    """Epochs of shuffled mini-batches over ``users``; keep the parameters with the best validation.

    ``validate(params, epoch)`` returns (selection score, record) and runs with the model in
    eval mode. ``patience`` > 0 stops after that many evaluations without improvement.
    ``dropout`` runs the training steps in train mode, with torch's RNG seeded per epoch.
    """
    state = init_opt_state(params)
    best = PooledRun({k: v.clone() for k, v in params.items()}, 0, float("-inf"))
    stale = 0
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        rng = seeded_rng(seed, epoch)
        torch.manual_seed(int(rng.integers(2**62)))
        model.train(dropout)
        order = rng.permutation(users)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = train_batch(data, sampler, order[start:start + batch_size], batch_size, max_len, negatives, rng)
            params, state, loss = local_step(model, params, state, batch.inputs, batch.targets,
                                             batch.negatives, settings)
            params = {k: v.detach() for k, v in params.items()}
            state = {k: v.detach() for k, v in state.items()}
            losses.append(float(loss))
        model.eval()
        if epoch % eval_every and epoch != epochs:
            continue
        score, record = validate(params, epoch)
        record.update(epoch=epoch, loss=float(np.mean(losses)))
        best.history.append(record)
        if score > best.best_score:
            best = PooledRun({k: v.clone() for k, v in params.items()}, epoch, score, best.history)
            stale = 0
        else:
            stale += 1
        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{score:.4f}", best=f"{best.best_score:.4f}@{best.best_epoch}")
        if patience and stale >= patience:
            break
    return best
