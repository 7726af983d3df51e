"""What the config builds for learning: a node's step settings, the adapter-wrapped model, the
evaluation set, the validation score and the population of nodes.

Why one room: the simulator, a real node, the baselines, serving and the benchmarks all turn the
same ``[train]``, ``[adapter]``, ``[eval]`` and ``[run]`` keys into these objects, and a key read
in two places drifts. Everything below ``learn`` takes plain arguments; this module is where the
config meets them.
"""

from __future__ import annotations

import numpy as np
import torch

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.learn.evaluate import EvalSet, build_eval_set
from p2prec.learn.local import StepSettings
from p2prec.learn.population import LocalPlan, Population, TrackingPlan
from p2prec.model.adapters import DualAdapterModel
from p2prec.model.backbone import SeqRecModel


def step_settings(cfg: Config, shared_names: list[str] | tuple[str, ...] = ()) -> StepSettings:
    """A node's step settings; ``shared_names`` get the shared adapter's own optimizer and lr."""
    t = cfg.train
    return StepSettings(lr=t.lr, loss=t.loss, weight_decay=t.weight_decay, shared_names=frozenset(shared_names),
                        shared_lr=t.shared_lr, shared_optimizer=t.shared_optimizer, momentum=t.momentum)


def adapter_model(backbone: SeqRecModel, cfg: Config) -> DualAdapterModel:
    """Wrap the frozen backbone with both adapters from the config, in eval mode (no dropout)."""
    a = cfg.adapter
    model = DualAdapterModel(backbone, a.rank_personal, a.rank_shared, a.alpha_personal, a.alpha_shared,
                             a.targets_personal, a.targets_shared, a.dropout, cfg.run.seed)
    return model.eval()


def selection_score(result: dict, cfg: Config) -> float:
    """The validation figure that picks the best round (``eval.select_protocol``/``select_metric``)."""
    return float(result["val"][cfg.eval.select_protocol][cfg.eval.select_metric])


def federated_eval_set(data: Dataset, cfg: Config, nodes: list[np.ndarray] | None = None) -> EvalSet:
    """The evaluation set of the federated users (of ``nodes``, default every node)."""
    nodes = nodes if nodes is not None else data.nodes(cfg.data.users_per_node)
    return build_eval_set(data, nodes, cfg.model.max_len, cfg.eval.sampled_negatives, cfg.run.seed)


def configured_population(model: DualAdapterModel, data: Dataset, cfg: Config, nodes: list[np.ndarray],
                          ids: np.ndarray | None = None, gossiped: bool = True) -> Population:
    """The population ``cfg`` describes. The simulator (all its nodes) and a real node (itself
    alone, with its global id in ``ids``) both build it here, so their local updates cannot drift.

    ``gossiped``: the nodes mix their states among themselves (flat gossip). Otherwise an
    aggregator's count-weighted average mixes them (an edge hierarchy, FedAvg's server), which
    already weighs each node by its samples, or nothing does (local-only); either way
    ``gossip.tracking_weight`` is not applied there.
    """
    t, g = cfg.train, cfg.gossip
    plan = LocalPlan(steps=t.local_steps, batch_size=t.batch_size, max_len=cfg.model.max_len, negatives=t.negatives,
                     seed=cfg.run.seed, dropout=t.backbone_dropout, chunk=cfg.sim.chunk, lr_schedule=t.lr_schedule,
                     rounds=cfg.run.rounds, moments_dtype=getattr(torch, t.moments_dtype))
    tracking = TrackingPlan(g.tracking, g.tracking_fraction, g.tracking_weight if gossiped else "node")
    return Population(model, data, nodes, step_settings(cfg, model.shared_names()), plan, tracking, ids)
