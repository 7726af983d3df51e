"""The sharded simulator on Ray: one actor per shard, boundary states through the object store.

Why Ray: a population outgrows one machine, and Ray already schedules actors across a
cluster and moves objects between them; p2prec only says what each actor holds (one
backbone and its shard's stacked adapters, :class:`p2prec.sim.shard.Shard`) and which
states cross shards. Each exchange, every actor's :meth:`Shard.outbox` returns one object
per other shard (``num_returns``), and those objects are handed to the receiving actors'
:meth:`Shard.mix` as references: Ray moves them actor to actor, never through the driver.

Without ``sim.ray_address`` a small local Ray instance is started (one CPU per shard, at
least two, and a 512 MiB object store) and stopped with the pool; workers import the same
p2prec as this process. With an address (``ray start --head`` on one machine, ``ray start
--address HEAD:6379`` on the others), the cluster's nodes must have p2prec installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.model.backbone import SeqRecModel
from p2prec.run.data import select_nodes
from p2prec.sim.shard import Shard, shard_bounds
from p2prec.sim.sharded import ShardPool

OBJECT_STORE_BYTES = 512 * 2**20
"""Object store of a local instance: an exchange's boundary states at 754 ML-100K nodes on two
shards are tens of MB, and Ray frees each once both ends are done with it."""


def import_ray() -> Any:  # noqa: ANN401 - the ray module
    """Ray, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ValueError("sim.backend = 'ray' needs Ray: pip install 'p2prec[ray]'") from None
    return ray


class RayPool(ShardPool):
    """Shards in Ray actors, on a local instance or the cluster at ``address``."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph, shards: int,
                 address: str = "") -> None:
        super().__init__(shards)
        ray = self.ray = import_ray()
        bounds = shard_bounds(len(select_nodes(data, cfg)), shards)
        self.started = not ray.is_initialized()
        if self.started and address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        elif self.started:
            root = str(Path(__file__).resolve().parents[2])  # the folder holding this p2prec package
            ray.init(num_cpus=max(2, shards), object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
        actor = ray.remote(num_cpus=1)(Shard)
        common = [ray.put(x) for x in (cfg, data, backbone, graph)]
        self.members = [actor.remote(*common, bounds, i) for i in range(shards)]

    def map(self, method: str, *args: Any) -> list[Any]:
        return self.ray.get([getattr(a, method).remote(*args) for a in self.members])

    def exchange(self, rnd: int, exchange: int) -> tuple[int, int]:
        outs = [a.outbox.options(num_returns=self.shards).remote(rnd, exchange) for a in self.members]
        outs = outs if self.shards > 1 else [[ref] for ref in outs]
        done = [a.mix.remote(*(outs[u][t] for u in range(self.shards) if u != t)) for t, a in enumerate(self.members)]
        return self.ray.get(done)[0]

    def close(self) -> None:
        for a in self.members:
            self.ray.kill(a)
        self.members = []
        if self.started:
            self.ray.shutdown()
