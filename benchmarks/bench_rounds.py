"""Protocol overhead of real node processes: round time minus the local-update time, per node-round.

Starts ``--processes`` (default 16) real ``p2prec-node`` processes on 127.0.0.1 through the
launcher of ``p2prec-sim --processes``, on a seeded subsample of the federated ML-100K
nodes, and reads every node's ``rounds.jsonl``. For each node and round:

- ``local_s``: the local update (the simulator's per-node step);
- ``round_s``: the whole round: local update, encoding and sending, waiting for the
  neighbours, mixing, and the checkpoint (evaluation is excluded; the run evaluates once);
- overhead = ``round_s - local_s``: what the protocol adds to a round, which includes waiting
  for the slowest neighbour's local update and the per-round fsync'ed checkpoint.

With more processes than cores every duration stretches by time-slicing, the local update
included, so compare runs at several ``--processes`` on the same machine.

Reported as medians (and p90) over node-rounds, skipping each node's first round, which also
absorbs the other processes' start-up. Side by side, the simulator's time per round for the
same nodes, config and topology, in one process.

Run: ``python benchmarks/bench_rounds.py [--processes 16] [--rounds 30] [--data-dir DIR] [--set k=v]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, setup  # noqa: E402

from p2prec.node.runtime import ROUNDS  # noqa: E402
from p2prec.sim.engine import Simulation  # noqa: E402
from p2prec.launch import prepare, run_nodes  # noqa: E402
from p2prec.sim.runner import build_topology  # noqa: E402


def node_rounds(folder: Path, ids: list[int]) -> list[dict]:
    """Every node's per-round records after its first round."""
    records = []
    for i in ids:
        lines = (folder / f"node-{i}" / ROUNDS).read_text().splitlines()
        records += [json.loads(line) for line in lines[1:]]
    return records


def simulated_round_s(cfg, data, backbone, rounds: int) -> float:  # noqa: ANN001
    """Median wall time of one simulated round (vectorized local updates plus mixing)."""
    sim = Simulation(cfg, data, backbone, build_topology(cfg, cfg.sim.nodes))
    times = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        sim.step(rnd)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=16)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--topology", default="small-world:k=4,p=0.2")
    p.add_argument("--out", help="run folder (default: a temporary folder)")
    args = p.parse_args()
    args.overrides = [f"gossip.topology={args.topology}", f"run.rounds={args.rounds}",
                      f"eval.every={args.rounds}", "node.deadline_s=60", "node.start_timeout_s=300",
                      *args.overrides]
    cfg, data, backbone = setup(args)
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as tmp:
        out = Path(args.out or tmp)
        ids = prepare(cfg, data, out, args.processes)
        start = time.perf_counter()
        run_nodes(out, ids, cfg.run.rounds, None, progress=False)
        wall = time.perf_counter() - start
        records = node_rounds(out / "nodes", ids)
        sim_s = simulated_round_s(cfg, data, backbone, min(args.rounds, 10))
    round_s = np.asarray([r["round_s"] - r["eval_s"] for r in records])
    local_s = np.asarray([r["local_s"] for r in records])
    checkpoint_s = np.asarray([r["checkpoint_s"] for r in records])
    overhead = round_s - local_s
    print(f"{args.processes} node processes, {args.topology}, {args.rounds} rounds, "
          f"{len(records)} node-rounds timed, {wall:.1f} s wall (start-up included)")
    print("| per node-round | median | p90 |\n|---|---|---|")
    for name, values in (("round (without evaluation)", round_s), ("local update", local_s),
                         ("protocol overhead = round - local update", overhead),
                         ("  of which checkpoint (write + fsync + rename)", checkpoint_s),
                         ("  of which sending, waiting for neighbours, mixing", overhead - checkpoint_s)):
        print(f"| {name} | {1000 * np.median(values):.1f} ms | {1000 * np.percentile(values, 90):.1f} ms |")
    print(f"overhead share of a round: {np.median(overhead) / np.median(round_s):.2f}")
    print(f"simulator, same {args.processes} nodes in one process: {1000 * sim_s:.1f} ms per round; "
          f"real round / simulated round: {np.median(round_s) / sim_s:.1f}x")


if __name__ == "__main__":
    main()
