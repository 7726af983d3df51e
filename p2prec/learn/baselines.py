"""Baselines through the same model, local-step and evaluation code as the nodes.

- backbone-only: the frozen backbone, zero-shot (fresh adapters are exactly a no-op);
- centralized: the federated users' training data pooled, one set of adapters trained
  centrally with the same local step, an upper bound;
- local-only: every node trains its own adapters alone, with no communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


from p2prec.config import Config
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.central import train_pooled
from p2prec.learn.evaluate import evaluate
from p2prec.learn.factories import federated_eval_set, selection_score
from p2prec.learn.local import Params, StepSettings
from p2prec.model.adapters import DualAdapterModel

@dataclass
class BaselineResult:
    """Per-epoch records (the best one is picked from them by validation) and the wall time."""

    records: list[dict]
    wall_s: float


def run_backbone_only(model: DualAdapterModel, data: Dataset, cfg: Config) -> BaselineResult:
    """Zero-shot: evaluate the initial (no-op) adapters on the federated users."""
    start = time.perf_counter()
    es = federated_eval_set(data, cfg)
    result = evaluate(model, model.trainable_state(), es, tuple(cfg.eval.protocols), k=cfg.eval.k)
    record = {"round": 0, **result, "loss": None}
    return BaselineResult([record], time.perf_counter() - start)


def run_centralized(model: DualAdapterModel, data: Dataset, cfg: Config, epochs: int = 0) -> BaselineResult:
    """Pool every federated user's training data and train one set of adapters.

    Uses ``[central]`` for learning rate, batch size, epochs (unless ``epochs`` is given)
    and early-stopping patience, and ``[train]`` for the loss and negatives.
    """
    start = time.perf_counter()
    sampler = NegativeSampler(data)
    es = federated_eval_set(data, cfg)
    protocols = tuple(cfg.eval.protocols)

    def validate(params: Params, epoch: int) -> tuple[float, dict]:
        result = evaluate(model, params, es, protocols, k=cfg.eval.k)
        return selection_score(result, cfg), {"round": epoch, **result}

    c = cfg.central
    settings = StepSettings(lr=c.lr, loss=cfg.train.loss, weight_decay=cfg.train.weight_decay)
    run = train_pooled(model, model.trainable_state(), data, sampler, data.federated_users,
                       settings, epochs=epochs or c.epochs, batch_size=c.batch_size,
                       max_len=cfg.model.max_len, negatives=cfg.train.negatives, seed=cfg.run.seed,
                       validate=validate, eval_every=cfg.eval.every, patience=c.patience,
                       dropout=cfg.train.backbone_dropout, desc="centralized")
    return BaselineResult(run.history, time.perf_counter() - start)
