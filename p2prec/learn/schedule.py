"""Learning-rate schedules over a run's rounds, shared by the simulator and the real node.

Why decay at all: in decentralized SGD the nodes' disagreement (the consensus distance)
grows with the step size, and with one user's sequence per step each node's gradient is
noisy; a constant step leaves both at a floor, so validation plateaus and wobbles. A
cosine decay towards the last round shrinks both. Measured on ML-100K it did smooth
validation, but it lowered test NDCG@10 (docs/experiments.md, "Learning rates"), so ``constant`` is the default.
The factor depends on the round number alone, so every node, simulated or real, computes
the same one without hearing from anyone.
"""

from __future__ import annotations

import dataclasses
import math

from p2prec.learn.local import StepSettings

SCHEDULES = ("constant", "cosine")


def lr_factor(kind: str, round_: int, rounds: int) -> float:
    """The factor on the learning rates in round ``round_`` (1-based) of ``rounds``.

    ``cosine`` falls from 1 in round 1 to ``(1 - cos(pi / rounds)) / 2`` in the last round,
    so the last round still takes a (small) step.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"train.lr_schedule: unknown schedule {kind!r} (expected one of {', '.join(SCHEDULES)})")
    if kind == "constant" or rounds <= 1:
        return 1.0
    progress = min(max(round_ - 1, 0), rounds - 1) / rounds
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled(settings: StepSettings, factor: float) -> StepSettings:
    """``settings`` with both learning rates (personal and shared) multiplied by ``factor``."""
    if factor == 1.0:
        return settings
    return dataclasses.replace(settings, lr=settings.lr * factor, shared_lr=settings.shared_lr * factor)
