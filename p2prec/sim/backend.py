"""Which engine runs a simulation: a small registry from ``sim.backend`` to a factory.

Why a registry (the shape of Flower's simulation backends): the runner and the benchmarks
ask for "the configured simulation" and get a :class:`p2prec.sim.engine.Simulation`
whatever runs it, and an engine with optional dependencies (Ray) is imported only when
chosen, so the core package never needs it.

- ``local``: every node in this process (:class:`Simulation`, or on the simulated clock, or asynchronous:
  :func:`p2prec.sim.events.build_simulation`), the default and the full feature set;
- ``shards``: the sharded path in this process (:class:`p2prec.sim.sharded.LocalPool`), for checking it;
- ``ray``: the sharded path on Ray actors (:class:`p2prec.sim.ray_backend.RayPool`), at ``sim.ray_address``
  or on a local instance.
"""

from __future__ import annotations

from typing import Callable

import networkx as nx

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.model.backbone import SeqRecModel
from p2prec.sim.engine import Simulation

Factory = Callable[[Config, Dataset, SeqRecModel, "nx.Graph | None"], Simulation]

DEFAULT_SHARDS = 2
"""Shards when ``sim.shards`` is 0: a local Ray instance is kept to two CPUs."""


def _local(cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> Simulation:
    from p2prec.sim.events import build_simulation

    return build_simulation(cfg, data, backbone, graph)


def _shards(cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> Simulation:
    from p2prec.sim.sharded import LocalPool, ShardedSimulation, check_sharded

    check_sharded(cfg, graph)
    return ShardedSimulation(cfg, data, backbone, graph,
                             LocalPool(cfg, data, backbone, graph, cfg.sim.shards or DEFAULT_SHARDS))


def _ray(cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> Simulation:
    from p2prec.sim.ray_backend import RayPool, import_ray
    from p2prec.sim.sharded import ShardedSimulation, check_sharded

    import_ray()
    check_sharded(cfg, graph)
    pool = RayPool(cfg, data, backbone, graph, cfg.sim.shards or DEFAULT_SHARDS, cfg.sim.ray_address)
    try:
        return ShardedSimulation(cfg, data, backbone, graph, pool)
    except BaseException:
        pool.close()
        raise


BACKENDS: dict[str, Factory] = {"local": _local, "shards": _shards, "ray": _ray}


def make_simulation(cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> Simulation:
    """The simulation ``cfg.sim.backend`` names; :meth:`Simulation.close` releases its engine."""
    return BACKENDS[cfg.sim.backend](cfg, data, backbone, graph)

