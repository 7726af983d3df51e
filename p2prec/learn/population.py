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

from dataclasses import dataclass

import numpy as np
import torch

from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import TRACK
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


@dataclass(frozen=True)
class LocalPlan:
    """How every node of a population trains in a round, fixed for the run.

    ``steps`` local steps of ``batch_size`` sequences (cut to ``max_len``, ``negatives``
    sampled negatives each), drawn from (``seed``, round, global node id, step) alone;
    ``dropout`` keeps the backbone's dropout on; ``chunk`` nodes go through one batched
    forward; ``lr_schedule`` scales the learning rates over ``rounds``; ``moments_dtype`` holds
    Adam's moments (``train.moments_dtype``).
    """

    steps: int
    batch_size: int
    max_len: int
    negatives: int
    seed: int
    dropout: bool = False
    chunk: int = 128
    lr_schedule: str = "constant"
    rounds: int = 0
    moments_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class TrackingPlan:
    """Gradient tracking of the shared adapter (:mod:`p2prec.learn.tracking`): off, or on with
    the seeded ``fraction`` of nodes that fold a fresh gradient in each round and the ``weight``
    each node's gradient counts for (``node`` or ``samples``)."""

    enabled: bool = False
    fraction: float = 1.0
    weight: str = "node"


class Population:
    """The trainable state of N nodes and their local updates.

    Invariant: ``params[name][i]`` is node i's tensor ``name`` (the model's parameter
    names); ``state`` holds the matching Adam moments and per-node step counts ``t`` and,
    with ``tracking``, each node's tracker and last gradient of the shared adapter.
    ``counts[i]`` is node i's number of training interactions (FedAvg's and the tracked
    average's weight).
    """

    def __init__(self, model: DualAdapterModel, data: Dataset, nodes: list[np.ndarray], settings: StepSettings,
                 plan: LocalPlan, tracking: TrackingPlan = TrackingPlan(), ids: np.ndarray | None = None) -> None:
        self.model = model
        self.data = data
        self.sampler = NegativeSampler(data)
        self.nodes = nodes
        self.settings = settings
        self.plan = plan
        # Global node ids seed each node's batches, so a real node holding a population of one
        # (its own) draws exactly the batches the simulator draws for it.
        self.ids = np.arange(len(nodes)) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(self.ids) != len(nodes):
            raise ValueError(f"population: {len(self.ids)} ids for {len(nodes)} nodes")
        self.params = stack(model.trainable_state(), len(nodes))
        self.state = init_opt_state(self.params, batch_dims=1)
        # Adam's moments may be held in a narrower dtype (``train.moments_dtype``): steps compute
        # in float32 (:meth:`_read`) and round on the way back. Trackers and last gradients stay
        # float32: a tracker adds and subtracts gradients for ever, and rounding would accumulate.
        for k in [k for k in self.state if k.startswith(("m.", "v."))]:
            self.state[k] = self.state[k].to(plan.moments_dtype)
        self.shared_names = model.shared_names()
        self.tracking = tracking.enabled
        self.tracking_fraction = tracking.fraction
        self.counts = np.asarray([sum(len(data.train[u]) for u in users) for users in nodes], dtype=np.float64)
        self.weights = gradient_weights(tracking.weight, self.counts)
        lr_factor(plan.lr_schedule, 1, plan.rounds)  # an unknown schedule fails here, not mid-run
        if self.tracking:
            self.state.update(init_tracking_state(self._shared_params(), self.state["t"]))
        self._batched = BatchedAdapterModel(model)

    @property
    def device(self) -> torch.device:
        """Where the stacked states live: the model's device, from which they were copied."""
        return next(iter(self.params.values())).device

    @property
    def size(self) -> int:
        return len(self.nodes)

    def node_batch(self, node: int, round_: int, step: int) -> TrainBatch:
        """Node ``node``'s batch for a step; seeded by (seed, round, global node id, step) alone."""
        p = self.plan
        rng = seeded_rng(p.seed, round_, int(self.ids[node]), step)
        return train_batch(self.data, self.sampler, self.nodes[node], p.batch_size, p.max_len, p.negatives, rng)

    def train_round(self, round_: int, active: np.ndarray | None = None, vectorized: bool = True,
                    node_rounds: np.ndarray | None = None) -> float:
        """Run the plan's local steps on every active node; return their mean loss.

        With tracking, each chunk takes its tracked step right after its last local step: its
        rows are its own, so the result is the same as stepping every node afterwards, and the
        shared gradients summed over the steps are held for all nodes only when there are
        several steps (one step's are the chunk's own gradients).

        ``node_rounds`` (asynchronous gossip, where each node counts its own updates): node
        ``i`` draws its batches for its own update ``node_rounds[i]``, as a real node of one
        does with ``round_`` = that index, so the two agree batch for batch.
        """
        active_ids = np.arange(self.size) if active is None else np.flatnonzero(active)
        draws = np.full(self.size, round_, dtype=np.int64) if node_rounds is None else node_rounds
        losses = torch.zeros(self.size)
        plan = self.plan
        settings = scaled(self.settings, lr_factor(plan.lr_schedule, round_, plan.rounds))
        summed = {k: torch.zeros_like(v) for k, v in self._shared_params().items()} \
            if self.tracking and plan.steps > 1 else {}
        for step in range(plan.steps):
            batches = [self.node_batch(int(i), int(draws[i]), step) for i in active_ids]
            torch.manual_seed(int(seeded_rng(plan.seed, round_, step).integers(2**62)))
            self.model.train(plan.dropout)
            track = round_ if self.tracking and step == plan.steps - 1 else None
            try:
                if vectorized:
                    self._vectorized_step(active_ids, batches, losses, summed, settings, track)
                else:
                    self._looped_step(active_ids, batches, losses, summed, settings, track)
            finally:
                self.model.eval()
        return float(losses[active_ids].mean()) if len(active_ids) and plan.steps else float("nan")

    @torch.no_grad()
    def _vectorized_step(self, ids: np.ndarray, batches: list[TrainBatch], losses: torch.Tensor,
                         summed: Params, settings: StepSettings, track: int | None) -> None:
        size = self.plan.chunk
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            rows = _rows(chunk)
            part = batches[start:start + size]
            inputs, targets, negatives = (torch.stack([getattr(b, name) for b in part]).to(self.device)
                                          for name in ("inputs", "targets", "negatives"))
            params = {k: v[rows] for k, v in self.params.items()}
            grads, loss = self._batched.loss_and_grads(params, inputs, targets, negatives, settings.loss)
            self._apply(chunk, rows, params, grads, summed, settings, track)
            losses[rows] = loss.cpu()

    @torch.no_grad()
    def _looped_step(self, ids: np.ndarray, batches: list[TrainBatch], losses: torch.Tensor,
                     summed: Params, settings: StepSettings, track: int | None) -> None:
        for i, batch in zip(ids, batches):
            params = {k: v[i] for k, v in self.params.items()}
            with torch.enable_grad():
                grads, loss = local_grads(self.model, params, batch.inputs.to(self.device),
                                          batch.targets.to(self.device), batch.negatives.to(self.device),
                                          settings.loss)
            self._apply(np.array([i]), int(i), params, {k: g.detach() for k, g in grads.items()}, summed, settings,
                        track)
            losses[i] = loss.detach().cpu()

    def _apply(self, ids: np.ndarray, rows: int | slice | torch.Tensor, params: Params, grads: Params,
               summed: Params, settings: StepSettings, track: int | None) -> None:
        """One local step for the nodes ``ids`` (indexed by ``rows``): Adam on every tensor, or, with
        tracking, on the private tensors only while the shared adapter's gradients add up in
        ``summed``; in round ``track``'s last step, the tracked step of the shared adapter follows."""
        if self.tracking:
            chunk_sum = {k: summed[k][rows] + grads[k] if summed else grads[k] for k in self.shared_names}
            if track is None:
                for k in self.shared_names:
                    summed[k][rows] = chunk_sum[k]
            params = {k: v for k, v in params.items() if k not in self.shared_names}
        keys = ["t", *(f"{moment}.{k}" for k in params for moment in ("m", "v"))]
        new_params, new_state = adam_step(params, grads, self._read(keys, rows), settings)
        for k, v in new_params.items():
            self.params[k][rows] = v
        for k, v in new_state.items():
            self.state[k][rows] = v
        if track is not None:
            self._track(ids, rows, chunk_sum, track, settings)

    def _read(self, keys: list[str], rows: int | slice | torch.Tensor) -> Params:
        """The state ``keys`` of the nodes ``rows`` in float32, whatever dtype holds the moments."""
        return {k: self.state[k][rows].float() for k in keys}

    def _track(self, ids: np.ndarray, rows: int | slice | torch.Tensor, summed: Params, round_: int,
               settings: StepSettings) -> None:
        """The round's tracked step of the shared adapter for the nodes ``ids``, on their mean
        gradient over the local steps (``summed``, one row per node of ``ids``), times its weight;
        nodes outside this round's participating share fold in zero."""
        shared = {k: self.params[k][rows] for k in self.shared_names}
        keys = [STEPS, *(f"{p}{k}" for k in self.shared_names for p in (TRACKER, LAST_GRAD, "m.", "v."))]
        take = torch.from_numpy(participation(self.plan.seed, round_, self.ids[ids], self.tracking_fraction))
        scale = (take.to(torch.float32) * self.weights[rows] / self.plan.steps).reshape(-1).to(self.device)
        scale = scale[0] if isinstance(rows, int) else scale  # one node's own (unstacked) tensors
        grads = {k: summed[k] * scale.reshape(*scale.shape, *[1] * (summed[k].dim() - scale.dim()))
                 for k in self.shared_names}
        stepped, new_state = tracked_step(shared, grads, self._read(keys, rows), settings)
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
