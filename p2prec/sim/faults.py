"""Seeded fault injection: message loss, churn, scheduled outages and stragglers.

Why per-round seeding: the faults of round ``t`` depend only on ``(seed, t)``, so a run can
be resumed, compared with another configuration, or replayed by real nodes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2prec.config import ConfigError, SimConfig
from p2prec.rng import Stream, seeded_rng


@dataclass(frozen=True)
class Outage:
    """Nodes ``nodes`` are down from round ``first`` to ``last`` inclusive."""

    first: int
    last: int
    nodes: tuple[int, ...]


@dataclass
class RoundFaults:
    """What goes wrong in one round. ``lost``: senders whose messages never arrive."""

    down: np.ndarray
    late: np.ndarray
    lost: np.ndarray
    drop_prob: float
    rng: np.random.Generator


def parse_outage(text: str, n: int) -> Outage:
    """Parse ``FIRST-LAST:NODE+NODE`` and check the node ids against the ``n`` simulated nodes."""
    try:
        span, nodes_text = text.split(":")
        first, last = (int(x) for x in span.split("-"))
        nodes = tuple(int(x) for x in nodes_text.split("+") if x)
    except ValueError:
        raise ConfigError(f"sim.down: {text!r} is not FIRST-LAST:NODE+NODE (e.g. 10-20:3+7)") from None
    bad = [v for v in nodes if not 0 <= v < n]
    if bad or first > last or not nodes:
        raise ConfigError(f"sim.down: {text!r} names unknown node ids {bad} (nodes are 0..{n - 1}) "
                          f"or an empty span")
    return Outage(first, last, nodes)


class FaultPlan:
    """Draws each round's faults from the config; no faults at all when everything is zero."""

    def __init__(self, cfg: SimConfig, n: int, seed: int) -> None:
        self.cfg = cfg
        self.n = n
        self.seed = seed
        self.outages = [parse_outage(t, n) for t in cfg.down]

    def round(self, rnd: int) -> RoundFaults:
        rng = seeded_rng(self.seed, rnd, Stream.FAULTS)
        down = rng.random(self.n) < self.cfg.churn
        for o in self.outages:
            if o.first <= rnd <= o.last:
                down[list(o.nodes)] = True
        straggling = (rng.random(self.n) < self.cfg.stragglers) & ~down
        late = straggling if self.cfg.straggler_mode == "late" else np.zeros(self.n, dtype=bool)
        lost = straggling if self.cfg.straggler_mode == "lost" else np.zeros(self.n, dtype=bool)
        return RoundFaults(down, late, lost, self.cfg.drop_prob, rng)
