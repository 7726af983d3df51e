"""Byzantine attacks for the simulator: what the chosen nodes send instead of their honest state.

The attacks are pure functions over the stacked ``[N, ...]`` tensors that all nodes are
about to send and a boolean mask ``[N]`` of the Byzantine ones; honest rows come back
unchanged and nothing is modified in place. The engine injects them between a node's
honest computation and what its neighbours receive, so the Byzantine nodes' own training
is untouched and the robust rules (:mod:`p2prec.gossip.robust`) see exactly the attack.

Kinds, with ``scale`` their one parameter:

- ``sign-flip``: send ``-scale * x``, the honest value reflected and magnified;
- ``noise``: send ``N(0, scale^2)`` in every coordinate, pure noise of that size;
- ``constant``: send ``scale`` in every coordinate, the same model from every attacker.

Which nodes are Byzantine is drawn once, from the run seed on a stream of its own, so the
same seed picks the same attackers whatever else the run does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from p2prec.rng import Stream, seeded_rng

ATTACKS = ("none", "sign-flip", "noise", "constant")
"""The attack kinds (``sim.attack`` in the config); ``none`` sends the honest state."""


def byzantine_count(value: float, nodes: int) -> int:
    """How many of ``nodes`` are Byzantine: ``value`` is a count if >= 1, else a fraction (rounded)."""
    if value < 0:
        raise ValueError(f"the Byzantine count or fraction must be non-negative, got {value}")
    if value >= 1:
        if not float(value).is_integer():
            raise ValueError(f"a Byzantine count must be a whole number, got {value}")
        count = int(value)
    else:
        count = round(value * nodes)
    if count > nodes:
        raise ValueError(f"{count} Byzantine nodes requested among only {nodes}")
    return count


def choose_byzantine(nodes: int, count: int, seed: int) -> torch.Tensor:
    """A boolean mask ``[nodes]`` with ``count`` True entries, drawn uniformly with ``seed``."""
    if not 0 <= count <= nodes:
        raise ValueError(f"cannot choose {count} Byzantine nodes among {nodes}")
    mask = np.zeros(nodes, dtype=bool)
    mask[seeded_rng(seed, Stream.BYZANTINE).choice(nodes, size=count, replace=False)] = True
    return torch.from_numpy(mask)


def inject(kind: str, sent: Mapping[str, torch.Tensor], byzantine: torch.Tensor, scale: float,
           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The tensors ``[N, ...]`` as received: Byzantine rows replaced by the attack ``kind``.

    ``generator`` feeds the ``noise`` attack; it draws only for the Byzantine rows, tensor
    by tensor in name order.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; known: {', '.join(ATTACKS)}")
    out = dict(sent)
    if kind == "none" or not bool(byzantine.any()):
        return out
    for name in sorted(sent):
        honest = sent[name]
        if honest.shape[0] != byzantine.shape[0]:
            raise ValueError(f"tensor {name!r} has {honest.shape[0]} rows, the Byzantine mask {byzantine.shape[0]}")
        rows = honest[byzantine]
        if kind == "sign-flip":
            bad = -scale * rows
        elif kind == "noise":
            bad = scale * torch.randn(rows.shape, generator=generator, dtype=rows.dtype)
        else:
            bad = torch.full_like(rows, scale)
        attacked = honest.clone()
        attacked[byzantine] = bad
        out[name] = attacked
    return out
