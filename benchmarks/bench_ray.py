"""Time per node-round of the in-process simulator against the Ray backend with 1 and 2 shards.

Measured side by side in one run, on the same config and nodes (all federated ML-100K nodes
by default): the median wall time of a round (local training, both exchanges, the
consensus distance), after one untimed round that pays each engine's start-up. The Ray
engines run on a local Ray instance (one CPU per shard, at least two); the in-process
engine uses ``--threads`` torch threads, each Ray actor one. So on two cores, two shards
are the fair comparison with ``--threads 2`` in-process. Also reported: the bytes that
crossed shards per exchange (the object store's traffic), from the shards' packets.

Run: ``python benchmarks/bench_ray.py [--data-dir DIR] [--set k=v] [--threads N] [--repeats R]``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_time, parser, setup  # noqa: E402

from p2prec.run.data import select_nodes  # noqa: E402
from p2prec.sim.backend import make_simulation  # noqa: E402
from p2prec.sim.runner import build_topology  # noqa: E402
from p2prec.sim.sharded import LocalPool  # noqa: E402


def crossing_bytes(cfg, data, backbone, graph, shards: int) -> tuple[int, int]:  # noqa: ANN001
    """Bytes of the states that cross shards in round 1's first exchange, and of all gossiped
    states together (in-process shards: the same packets Ray moves)."""
    pool = LocalPool(cfg, data, copy.deepcopy(backbone), graph, shards)
    pool.map("train", 1)
    out = [s.outbox(1, 0) for s in pool.members]
    moved = sum(v.numel() * v.element_size() for packets in out for p in packets if p is not None
                for v in p.states.values())
    return moved, sum(v.numel() * v.element_size() for s in pool.members for v in s.pop.shared().values())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3)
    args = p.parse_args()
    cfg, data, backbone = setup(args)
    n = len(select_nodes(data, cfg))
    graph = build_topology(cfg, n)
    rows = []
    for label, backend, shards in (("in-process", "local", 0), ("Ray, 1 shard", "ray", 1), ("Ray, 2 shards", "ray", 2)):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.sim.backend, run_cfg.sim.shards = backend, shards
        sim = make_simulation(run_cfg, data, copy.deepcopy(backbone), graph)
        try:
            counter = iter(range(1, 10_000))
            seconds = median_time(lambda: sim.step(next(counter)), args.repeats, warmup=1)
        finally:
            sim.close()
        rows.append((label, seconds))
    print(f"workload: {n} nodes, {cfg.train.local_steps} local step(s), {cfg.gossip.exchanges} exchanges, "
          f"topology {cfg.gossip.topology}, in-process torch threads {args.threads}, one per Ray actor; "
          f"median of {args.repeats} rounds after one untimed")
    print("| engine | round, median s | ms per node-round | vs in-process |\n|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {seconds / n * 1000:.2f} | {seconds / rows[0][1]:.2f}x |")
    moved, total = crossing_bytes(cfg, data, backbone, graph, 2)
    print(f"states crossing the two shards in one exchange: {moved / 2**20:.1f} MiB of {total / 2**20:.1f} MiB "
          "gossiped in all")

if __name__ == "__main__":
    main()
