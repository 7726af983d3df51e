"""Synchronous rounds on the simulated clock: a barrier that waits for the slowest node, or a deadline.

Why a subclass and not a mode of the engine: the math of a sync round does not change, only
who trains in it and how long it lasts (:class:`p2prec.sim.clock.NodeClock`). With a barrier
every node trains every round and a round lasts as long as the slowest update plus each
exchange's slowest link. With ``sim.deadline`` a round lasts the deadline plus the
exchanges, and a node whose update takes longer is busy: it neither trains, sends nor mixes
until the round its update completes (every ``ceil(compute / deadline)`` rounds), so its
update is taken on the state it started from, as a real node that missed deadlines would.
``metrics.jsonl`` records ``sim_time`` beside each round.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import networkx as nx
import numpy as np

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.model.backbone import SeqRecModel
from p2prec.sim.clock import NodeClock
from p2prec.sim.engine import Simulation
from p2prec.sim.faults import FaultPlan, RoundFaults


class BusyFaults:
    """The config's faults, plus: a node is down in the rounds its update has not yet completed."""

    def __init__(self, faults: FaultPlan, period: np.ndarray) -> None:
        self.faults = faults
        self.period = period

    def round(self, rnd: int) -> RoundFaults:
        f = self.faults.round(rnd)
        busy = rnd % self.period != 0
        return replace(f, down=f.down | busy, late=f.late & ~busy, lost=f.lost & ~busy)


class TimedSimulation(Simulation):
    """A sync :class:`Simulation` whose rounds take simulated time (see the module docstring)."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph) -> None:
        super().__init__(cfg, data, backbone, graph)
        if self.plan.kind != "flat":
            raise ValueError("sim.slow and sim.deadline need a flat topology (the clock models peer links)")
        self.clock = NodeClock(cfg.sim, graph, len(self.nodes), cfg.run.seed)
        self.round_s = self.clock.sync_round(cfg.gossip.exchanges, cfg.sim.deadline)
        self.faults = BusyFaults(self.faults, self.clock.period(cfg.sim.deadline))

    def run(self, rounds: int | None = None, progress: bool = True, label: str = "sim",
            on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
        def timed(records: list[dict]) -> None:
            for r in records:
                r.setdefault("sim_time", r["round"] * self.round_s)
            if on_record is not None:
                on_record(records)
        return super().run(rounds, progress, label, timed)
