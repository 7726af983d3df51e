"""Baselines through the same model, local-step and evaluation code as the nodes.

- backbone-only: the frozen backbone, zero-shot (fresh adapters are exactly a no-op);
- centralized: the federated users' training data pooled, one set of adapters trained
  centrally with the same local step, an upper bound;
- local-only: every node trains its own adapters alone, with no communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from p2prec.config import Config
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.central import train_pooled
from p2prec.learn.evaluate import EvalSet, build_eval_set, evaluate
from p2prec.learn.local import Params, StepSettings
from p2prec.model.adapters import DualAdapterModel
from p2prec.model.backbone import SeqRecModel

KINDS = ("centralized", "local-only", "backbone-only")


@dataclass
class BaselineResult:
    """Per-epoch records (the best one is picked from them by validation) and the wall time."""

    records: list[dict]
    wall_s: float


def step_settings(cfg: Config, shared_names: list[str] | tuple[str, ...] = ()) -> StepSettings:
    """A node's step settings; ``shared_names`` get the shared adapter's own optimizer and lr."""
    t = cfg.train
    return StepSettings(lr=t.lr, loss=t.loss, weight_decay=t.weight_decay, shared_names=frozenset(shared_names),
                        shared_lr=t.shared_lr, shared_optimizer=t.shared_optimizer, momentum=t.momentum)


def adapter_model(backbone: SeqRecModel, cfg: Config) -> DualAdapterModel:
    """Wrap the frozen backbone with both adapters from the config, in eval mode (no dropout)."""
    a = cfg.adapter
    model = DualAdapterModel(backbone, a.rank_personal, a.rank_shared, a.alpha_personal, a.alpha_shared,
                             a.targets_personal, a.targets_shared, a.dropout, a.seed)
    return model.eval()


def selection_score(result: dict, cfg: Config) -> float:
    return float(result["val"][cfg.eval.select_protocol][cfg.eval.select_metric])


def federated_eval_set(data: Dataset, cfg: Config, nodes: list[np.ndarray] | None = None) -> EvalSet:
    nodes = nodes if nodes is not None else data.nodes(cfg.data.users_per_node)
    return build_eval_set(data, nodes, cfg.model.max_len, cfg.eval.sampled_negatives, cfg.eval.seed)


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
                       max_len=cfg.model.max_len, negatives=cfg.train.negatives, seed=cfg.train.seed,
                       validate=validate, eval_every=cfg.eval.every, patience=c.patience,
                       dropout=cfg.train.backbone_dropout, desc="centralized")
    return BaselineResult(run.history, time.perf_counter() - start)
