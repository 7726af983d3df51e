"""``p2prec baseline``: one baseline through the simulator's runner, same code and protocol."""

from __future__ import annotations

from pathlib import Path

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.sim.runner import run_simulation


def run_baseline(kind: str, cfg: Config, data: Dataset, out: str | Path, backbone_dir: str | None = None,
                 epochs: int = 0) -> dict:
    """Train and evaluate one baseline, write ``out``, and return the summary.

    ``epochs`` overrides ``central.epochs`` (centralized) or ``sim.rounds`` (local-only).
    """
    cfg.sim.baseline = kind
    if epochs:
        cfg.central.epochs = epochs
        cfg.sim.rounds = epochs
    return run_simulation(cfg, data, Path(out), backbone_dir)
