"""Many nodes' adapters and optimizer states stacked ``[N, ...]`` on one frozen backbone.

Why stacked: memory grows with N x adapter size, never N x model size, and one call of
:class:`p2prec.learn.batched.BatchedAdapterModel` plus one :func:`p2prec.learn.local.adam_step`
trains a whole chunk of nodes. With ``tracking``, the shared adapter instead takes one
step per round along a tracker of the network's average gradient
(:mod:`p2prec.learn.tracking`), and its gossip message carries the trackers too. With
``vectorized=False``, :meth:`Population.train_round` instead takes gradients with
:func:`p2prec.learn.local.local_grads` (``functional_call`` of the peft model) node by
node, as a real node does; that loop is the reference the vectorized path is tested
against, and what the benchmarks compare it with.
"""

from __future__ import annotations

import numpy as np
import torch

from p2prec.config import Config
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import TRACK
from p2prec.learn.baselines import step_settings
from p2prec.learn.batches import TrainBatch, train_batch
from p2prec.learn.batched import BatchedAdapterModel
from p2prec.learn.local import Params, StepSettings, adam_step, init_opt_state, local_grads
from p2prec.learn.schedule import lr_factor, scaled
from p2prec.learn.tracking import (LAST_GRAD, STEPS, TRACKER, gradient_weights, init_tracking_state, participation,
                                   tracked_step)
from p2prec.model.adapters import DualAdapterModel
from p2prec.rng import seeded_rng


def stack(state: Params, n: int) -> Params:
    """``n`` copies of a per-node state, stacked along a new leading dimension."""
    return {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())).contiguous() for k, v in state.items()}


class Population:
    """The trainable state of N nodes and their local updates.

    Invariant: ``params[name][i]`` is node i's tensor ``name`` (the model's parameter
    names); ``state`` holds the matching Adam moments and per-node step counts ``t`` and,
    with ``tracking``, each node's tracker and last gradient of the shared adapter.
    ``counts[i]`` is node i's number of training interactions (FedAvg's and the tracked
    average's weight).
    """

    def __init__(self, model: DualAdapterModel, data: Dataset, sampler: NegativeSampler,
                 nodes: list[np.ndarray], settings: StepSettings, *, local_steps: int,
                 batch_size: int, max_len: int, negatives: int, seed: int, dropout: bool = False,
                 chunk: int = 128, ids: np.ndarray | None = None, tracking: bool = False,
                 tracking_fraction: float = 1.0, tracking_weight: str = "node", lr_schedule: str = "constant",
                 rounds: int = 0) -> None:
        self.model = model
        self.data = data
        self.sampler = sampler
        self.nodes = nodes
        self.settings = settings
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.max_len = max_len
        self.negatives = negatives
        self.seed = seed
        self.dropout = dropout
        self.chunk = chunk
        # Global node ids seed each node's batches, so a real node holding a population of one
        # (its own) draws exactly the batches the simulator draws for it.
        self.ids = np.arange(len(nodes)) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(self.ids) != len(nodes):
            raise ValueError(f"population: {len(self.ids)} ids for {len(nodes)} nodes")
        self.params = stack(model.trainable_state(), len(nodes))
        self.state = init_opt_state(self.params, batch_dims=1)
        self.shared_names = model.shared_names()
        self.tracking = tracking
        self.tracking_fraction = tracking_fraction
        self.counts = np.asarray([sum(len(data.train[u]) for u in users) for users in nodes], dtype=np.float64)
        self.weights = gradient_weights(tracking_weight, self.counts)
        self.lr_schedule = lr_schedule
        self.rounds = rounds
        lr_factor(lr_schedule, 1, rounds)  # an unknown schedule fails here, not mid-run
        if tracking:
            self.state.update(init_tracking_state(self._shared_params(), self.state["t"]))
        self._batched = BatchedAdapterModel(model)

    @property
    def size(self) -> int:
        return len(self.nodes)

    def node_batch(self, node: int, round_: int, step: int) -> TrainBatch:
        """Node ``node``'s batch for a step; seeded by (seed, round, global node id, step) alone."""
        rng = seeded_rng(self.seed, round_, int(self.ids[node]), step)
        return train_batch(self.data, self.sampler, self.nodes[node], self.batch_size, self.max_len,
                           self.negatives, rng)

    def train_round(self, round_: int, active: np.ndarray | None = None, vectorized: bool = True,
                    node_rounds: np.ndarray | None = None) -> float:
        """Run ``local_steps`` local steps on every active node; return their mean loss.

        ``node_rounds`` (asynchronous gossip, where each node counts its own updates): node
        ``i`` draws its batches for its own update ``node_rounds[i]``, as a real node of one
        does with ``round_`` = that index, so the two agree batch for batch."""
        active_ids = np.arange(self.size) if active is None else np.flatnonzero(active)
        draws = np.full(self.size, round_, dtype=np.int64) if node_rounds is None else node_rounds
        losses = torch.zeros(self.size)
        settings = scaled(self.settings, lr_factor(self.lr_schedule, round_, self.rounds))
        summed = {k: torch.zeros_like(v) for k, v in self._shared_params().items()} if self.tracking else {}
        for step in range(self.local_steps):
            batches = [self.node_batch(int(i), int(draws[i]), step) for i in active_ids]
            torch.manual_seed(int(seeded_rng(self.seed, round_, step).integers(2**62)))
            self.model.train(self.dropout)
            try:
                if vectorized:
                    self._vectorized_step(active_ids, batches, losses, summed, settings)
                else:
                    self._looped_step(active_ids, batches, losses, summed, settings)
            finally:
                self.model.eval()
        if self.tracking and self.local_steps and len(active_ids):
            self._track(active_ids, summed, round_, settings)
        return float(losses[active_ids].mean()) if len(active_ids) and self.local_steps else float("nan")

    @torch.no_grad()
    def _vectorized_step(self, ids: np.ndarray, batches: list[TrainBatch], losses: torch.Tensor,
                         summed: Params, settings: StepSettings) -> None:
        for start in range(0, len(ids), self.chunk):
            rows = _rows(ids[start:start + self.chunk])
            part = batches[start:start + self.chunk]
            inputs = torch.stack([b.inputs for b in part])
            targets = torch.stack([b.targets for b in part])
            negatives = torch.stack([b.negatives for b in part])
            params = {k: v[rows] for k, v in self.params.items()}
            grads, loss = self._batched.loss_and_grads(params, inputs, targets, negatives, settings.loss)
            self._apply(rows, params, grads, summed, settings)
            losses[rows] = loss

    @torch.no_grad()
    def _looped_step(self, ids: np.ndarray, batches: list[TrainBatch], losses: torch.Tensor,
                     summed: Params, settings: StepSettings) -> None:
        for i, batch in zip(ids, batches):
            params = {k: v[i] for k, v in self.params.items()}
            with torch.enable_grad():
                grads, loss = local_grads(self.model, params, batch.inputs, batch.targets, batch.negatives,
                                          settings.loss)
            self._apply(int(i), params, {k: g.detach() for k, g in grads.items()}, summed, settings)
            losses[i] = loss.detach()

    def _apply(self, rows: int | slice | torch.Tensor, params: Params, grads: Params, summed: Params,
               settings: StepSettings) -> None:
        """One local step for the nodes ``rows``: Adam on every tensor, or, with tracking, on
        the private tensors only while the shared adapter's gradients add up in ``summed``."""
        if self.tracking:
            for k in self.shared_names:
                summed[k][rows] += grads[k]
            params = {k: v for k, v in params.items() if k not in summed}
        keys = ["t", *(f"{moment}.{k}" for k in params for moment in ("m", "v"))]
        new_params, new_state = adam_step(params, grads, {k: self.state[k][rows] for k in keys}, settings)
        for k, v in new_params.items():
            self.params[k][rows] = v
        for k, v in new_state.items():
            self.state[k][rows] = v

    def _track(self, ids: np.ndarray, summed: Params, round_: int, settings: StepSettings) -> None:
        """The round's tracked step of the shared adapter for the nodes ``ids``, on their mean
        gradient over the local steps, times its weight; nodes outside this round's participating
        share fold in zero."""
        rows = _rows(ids)
        shared = {k: self.params[k][rows] for k in self.shared_names}
        keys = [STEPS, *(f"{p}{k}" for k in self.shared_names for p in (TRACKER, LAST_GRAD, "m.", "v."))]
        take = torch.from_numpy(participation(self.seed, round_, self.ids[ids], self.tracking_fraction))
        scale = take.to(torch.float32) * self.weights[rows] / self.local_steps
        grads = {k: summed[k][rows] * scale.view(-1, *[1] * (summed[k].dim() - 1)) for k in self.shared_names}
        stepped, new_state = tracked_step(shared, grads, {k: self.state[k][rows] for k in keys}, settings)
        for k, v in stepped.items():
            self.params[k][rows] = v
        for k, v in new_state.items():
            self.state[k][rows] = v

    def _shared_params(self) -> Params:
        return {k: self.params[k] for k in self.shared_names}

    def shared(self) -> Params:
        """What a node gossips, stacked: its shared-adapter tensors and, with tracking, its
        trackers as ``track.<name>`` (views into :attr:`params` and :attr:`state`)."""
        gossiped = self._shared_params()
        if self.tracking:
            gossiped.update({TRACK + k: self.state[TRACKER + k] for k in self.shared_names})
        return gossiped


def _rows(ids: np.ndarray) -> slice | torch.Tensor:
    """Index of a chunk's nodes: a slice (views, no copies) when they are consecutive, as
    when every node is up; otherwise an index tensor."""
    if len(ids) and ids[-1] - ids[0] == len(ids) - 1:
        return slice(int(ids[0]), int(ids[-1]) + 1)
    return torch.from_numpy(ids)


def gossip_template(model: DualAdapterModel, tracking: bool) -> Params:
    """One node's gossip message as tensors (trackers zero): what a receiver expects, and
    what the simulator sizes its messages by."""
    shared = model.shared_state()
    if tracking:
        shared.update({TRACK + k: torch.zeros_like(v) for k, v in list(shared.items())})
    return shared


def configured_population(model: DualAdapterModel, data: Dataset, cfg: Config, nodes: list[np.ndarray],
                          ids: np.ndarray | None = None, gossiped: bool = True) -> Population:
    """The population ``cfg`` describes. The simulator (all its nodes) and a real node (itself
    alone, with its global id in ``ids``) both build it here, so their local updates cannot drift.

    ``gossiped``: the nodes mix their states among themselves (flat gossip). Otherwise an
    aggregator's count-weighted average mixes them (an edge hierarchy, FedAvg's server), which
    already weighs each node by its samples, or nothing does (local-only); either way
    ``gossip.tracking_weight`` is not applied there.
    """
    t = cfg.train
    weight = cfg.gossip.tracking_weight if gossiped else "node"
    return Population(model, data, NegativeSampler(data), nodes, step_settings(cfg, model.shared_names()),
                      local_steps=t.local_steps, batch_size=t.batch_size, max_len=cfg.model.max_len,
                      negatives=t.negatives, seed=t.seed, dropout=t.backbone_dropout, chunk=cfg.sim.chunk,
                      ids=ids, tracking=cfg.gossip.tracking, tracking_fraction=cfg.gossip.tracking_fraction,
                      tracking_weight=weight, lr_schedule=t.lr_schedule, rounds=cfg.sim.rounds)
