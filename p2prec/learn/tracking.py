"""Gradient tracking for the shared adapter: each node steps along its estimate of the
network's average gradient, not along its own user's gradient.

Why: with one user per node, a node's own gradient of the shared adapter points at that
user's optimum. Decentralized SGD or Adam steps each node along it, and a sparse graph
averages the steps too slowly to undo the drift: on ML-100K every small-world setting
tried without tracking stayed level with local-only (docs/experiments.md, "Gradient
tracking"), and even exact averaging (FedAvg) of per-node Adam steps fell short of the
pooled adapters, because Adam normalises each user's gradient before the average instead
of after. Gradient tracking (DIGing; Nedic, Olshevsky and Shi, 2017) in its
adapt-then-combine form fixes both. Node i keeps a tracker ``y_i`` and its last gradient:

    y_i <- y_i + g_i(t) - g_i(t-1)        # correct the estimate by the change of its own gradient
    x_i <- x_i - opt(y_i)                 # the shared optimizer steps along the estimate
    send (x_i, y_i); both are mixed with the same gossip weights.

Mixing keeps the weighted sum of the trackers equal to the weighted sum of the latest
gradients, so once the trackers agree every node's optimizer sees the network's average
gradient and the shared adapters move like one full-batch optimizer on all users' data.

That full-batch step has a cost on small data: centrally, the same adapters trained with
full-batch Adam at the decentralized step size (3e-3) reach the validation score of
mini-batch Adam but a lower test score; at 1e-3 they match it (docs/experiments.md,
"What the test score depends on"). ``fraction`` < 1 is the other way to give the tracked
step mini-batch noise: each round only a seeded random share of the nodes folds a fresh
gradient into its tracker, the others fold in zero, so the trackers follow the gradient
of a random subset of users (scaled by the share, which Adam's normalisation ignores). Every node draws its own
membership from the shared seed and the round, so no coordinator is needed. Measured on
ML-100K small-world at 0.1 it did not help: the trackers then change faster than gossip
averages them.

With ``gossip.tracking_weight = "samples"`` (the default) each node's
``g_i`` is its gradient times its training-interaction count (:func:`gradient_weights`), so
the trackers follow the count-weighted average gradient, FedAvg's objective.

The trackers travel with the shared adapter under the names ``track.<tensor>``, so the
codec, the privacy mechanism, the robust rules and the wire validator treat them like any
other gossiped tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from p2prec.learn.local import Params, StepSettings, adam_step
from p2prec.rng import Stream, seeded_rng

TRACKER = "y."
"""Optimizer-state prefix of a node's tracker of the average gradient."""

LAST_GRAD = "g."
"""Optimizer-state prefix of the gradient a node last folded into its tracker."""

STEPS = "t.shared"
"""Optimizer-state key of the shared optimizer's step count (one tracked step per round)."""


def participation(seed: int, round_: int, ids: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each node (by global id) folds a fresh gradient into its tracker this round.

    Each node's draw depends on (seed, round, its own id) alone, so a real node computes its
    own without hearing from anyone, and the simulator draws the same for all.
    """
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    return np.asarray([seeded_rng(seed, round_, int(i), Stream.PARTICIPATION).random() < fraction for i in ids],
                      dtype=bool)


def gradient_weights(kind: str, counts: np.ndarray) -> torch.Tensor:
    """Each node's weight in the tracked average gradient, from its training-interaction counts.

    Why ``samples``: with doubly-stochastic mixing the trackers follow the plain mean of the
    nodes' gradients, so a user with 20 ratings pulls the shared adapter as hard as one with
    500; FedAvg's server and centralized training instead count every interaction once. Scaling
    a node's gradient by its own count before it enters the tracker gives the decentralized
    run that same objective. No global normaliser is needed, and none is known to a lone node:
    the tracked step is Adam, which divides out the gradient's overall scale.
    """
    if kind == "node":
        return torch.ones(len(counts))
    if kind == "samples":
        return torch.as_tensor(counts, dtype=torch.float32)
    raise ValueError(f"gossip.tracking_weight: unknown weighting {kind!r}; use 'node' or 'samples'")


def init_tracking_state(shared: Params, like_steps: torch.Tensor) -> Params:
    """Zero trackers, zero last gradients and a zero step count, shaped like ``shared``.

    ``like_steps`` is the population's per-node step count ``t``, whose shape and dtype the
    shared optimizer's own count copies.
    """
    state = {TRACKER + k: v.new_zeros(v.shape) for k, v in shared.items()}
    state.update({LAST_GRAD + k: v.new_zeros(v.shape) for k, v in shared.items()})
    state[STEPS] = like_steps.new_zeros(like_steps.shape)
    return state


def tracked_step(shared: Params, grads: Params, state: Params, settings: StepSettings) -> tuple[Params, Params]:
    """One round's tracked update of the shared adapter, for one node or a stack of nodes.

    ``grads`` is the node's gradient this round (the mean over its local steps); ``state``
    holds its tracker, last gradient, and the shared optimizer's moments (``m.``/``v.``)
    and step count. Returns the new shared tensors and the new state entries.
    """
    tracker = {k: state[TRACKER + k] + grads[k] - state[LAST_GRAD + k] for k in shared}
    moments = {key: state[key] for k in shared for key in (f"m.{k}", f"v.{k}")}
    stepped, new_moments = adam_step(shared, tracker, {**moments, "t": state[STEPS]}, settings)
    new_state = {TRACKER + k: tracker[k] for k in shared}
    new_state.update({LAST_GRAD + k: grads[k] for k in shared})
    new_state[STEPS] = new_moments.pop("t")
    new_state.update(new_moments)
    return stepped, new_state
