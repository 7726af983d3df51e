"""A run's data set and its nodes, read from the config the same way by every engine.

Why here: the simulator, a real node, the launcher, serving and ``p2prec privacy`` must all
agree that node ``i`` holds the same users, or a real network would not reproduce its
simulation and a served user would be scored with another node's adapter.
"""

from __future__ import annotations

import numpy as np

from p2prec.config import Config
from p2prec.data import load_dataset
from p2prec.data.split import Dataset
from p2prec.rng import Stream, seeded_rng


def load_data(cfg: Config) -> Dataset:
    """The data set ``cfg.data`` names, split as it prescribes."""
    return load_dataset(cfg.data.name, cfg.data.dir or None, cfg.data.public_fraction, cfg.run.seed,
                        cfg.data.min_interactions, cfg.data.cold_items)


def select_nodes(data: Dataset, cfg: Config) -> list[np.ndarray]:
    """All federated nodes, or a seeded subsample of ``sim.nodes`` of them (kept in id order)."""
    nodes = data.nodes(cfg.data.users_per_node)
    if cfg.sim.nodes and cfg.sim.nodes < len(nodes):
        keep = np.sort(seeded_rng(cfg.run.seed, Stream.NODES).choice(len(nodes), cfg.sim.nodes, replace=False))
        nodes = [nodes[i] for i in keep]
    return nodes
