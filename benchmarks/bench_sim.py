"""Simulator speed and memory on the quality run's own workload (all federated ML-100K nodes).

Measured side by side in one run:
1. time per round, vectorized (hand-batched chunks, :mod:`p2prec.learn.batched`) against a
   plain per-node loop over the same local-step and mixing code, and their ratio (the bar is
   at least 20x); the same for local training alone, and what else a round spends
   (batch building, mixing), since those are shared by both paths and bound the ratio;
2. the floor under the vectorized path: the frozen backbone alone, forward and backward to
   its inputs, over the same round's batches in the same chunks (no LoRA terms, no optimizer,
   no batch building, no mixing). No batched implementation of this workload in PyTorch on
   this CPU can train a round faster; 20x needs a round at 1/20 of the loop's time;
3. local training time per chunk size (``sim.chunk``), the default's justification;
4. memory growth per extra simulated node (resident memory of two child processes at two node
   counts) against the bytes of one node's adapters plus optimizer state (the bar is at most 3x).

With ``--nodes N`` it measures scale instead, in this one process: ``N`` nodes of the
configured data (``--synthetic USERS`` first writes the generator's data set of that many
users, shaped like ML-1M: 3,706 items, 20 to 60 interactions each; 12,500 users give 10,000
federated nodes), ``--rounds`` rounds and one evaluation. It reports CPU milliseconds per
node-round, resident memory before the simulation, after the rounds and at its peak
(sampled every 10 ms), the round's and the evaluation's scratch memory above the resident
state, and memory per node against its adapters plus optimizer state (the bars: peak under
20 GB at 10,000 nodes; at most 3x per node).

Run: ``python benchmarks/bench_sim.py [--data-dir DIR] [--set k=v] [--threads N] [--chunks 32,64,128,256]``, or
``python benchmarks/bench_sim.py --nodes 10000 --synthetic 12500 --data-dir runs/synth1m --set data.name=synthetic``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_time, parser, setup  # noqa: E402

from p2prec.learn.batches import TrainBatch  # noqa: E402
from p2prec.learn.local import ranking_loss  # noqa: E402
from p2prec.model.backbone import build_backbone, score  # noqa: E402
from p2prec.run.data import select_nodes  # noqa: E402
from p2prec.sim.engine import Simulation  # noqa: E402
from p2prec.sim.runner import build_topology  # noqa: E402


def per_node_state_bytes(sim: Simulation) -> int:
    """Bytes of one node's stacked adapters, gate and optimizer state."""
    tensors = list(sim.pop.params.values()) + list(sim.pop.state.values())
    return sum(t[0].numel() * t.element_size() for t in tensors)


def backbone_floor(sim: Simulation, batches: list[TrainBatch], n_items: int) -> None:
    """The frozen backbone's forward and backward, to its input embeddings, over ``batches``
    in the simulator's chunks and with its loss: what any batched local step must compute."""
    c = sim.cfg.model
    backbone = build_backbone(n_items, c.hidden, c.layers, c.heads, c.intermediate,
                              c.max_len, c.dropout, c.causal).train(sim.cfg.train.backbone_dropout)
    backbone.requires_grad_(False)
    for start in range(0, len(batches), sim.cfg.sim.chunk):
        part = batches[start:start + sim.cfg.sim.chunk]
        inputs, targets = torch.cat([b.inputs for b in part]), torch.cat([b.targets for b in part])
        candidates = torch.cat([targets.unsqueeze(-1), torch.cat([b.negatives for b in part])], dim=-1)
        embeds = backbone.item_emb(inputs).requires_grad_(True)
        hidden = backbone.encoder.embeddings(inputs_embeds=embeds)
        states = backbone.encoder.encoder(hidden, attention_mask=backbone.attention_mask(inputs)).last_hidden_state
        scores = score(states, backbone.item_emb(candidates).requires_grad_(True))
        mask = (targets != 0).to(scores.dtype)
        ranking_loss(scores[..., 0], scores[..., 1:], mask, sim.cfg.train.loss).backward()


def child_rss(args: list[str], nodes: int) -> int:
    """Resident memory (bytes) of a child after it built a simulation of ``nodes`` nodes and ran 2 rounds.

    Current RSS, not peak: the peak is set by one-off phases (data loading, evaluation
    buffers) that do not grow with the number of nodes and would hide the per-node growth.
    """
    code = ("import sys, json, resource; sys.argv=sys.argv[:1]+json.loads(sys.argv[1]); "
            "sys.path.insert(0, %r); import bench_sim; bench_sim.child()" % str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args + ["--set", f"sim.nodes={nodes}"])],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def child() -> None:
    args = parser("child").parse_args()
    cfg, data, backbone = setup(args)
    sim = Simulation(cfg, data, backbone, build_topology(cfg, len(select_nodes(data, cfg))))
    sim.step(1)
    sim.step(2)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    print(pages * resource.getpagesize())


def rss() -> int:
    """This process's resident memory now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


class PeakSampler:
    """The highest resident memory seen while a ``with`` block runs (sampled every 10 ms)."""

    def __enter__(self) -> PeakSampler:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def scale(args) -> None:  # noqa: ANN001
    """The ``--nodes`` measurement (see the module docstring)."""
    if args.synthetic:
        from p2prec.data.synthetic import generate

        folder = Path(args.data_dir) / "synthetic"
        if not (folder / "u.data").is_file():
            generate(folder, users=args.synthetic, items=3706, communities=20, min_len=20, max_len=60, seed=0)
    args.overrides.append(f"sim.nodes={args.nodes}")
    cfg, data, backbone = setup(args)
    n = len(select_nodes(data, cfg))
    graph = build_topology(cfg, n)
    before = rss()
    with PeakSampler() as built:
        sim = Simulation(cfg, data, backbone, graph)
    state = per_node_state_bytes(sim)
    sim.step(1)  # warm-up: first-touch of every page and the allocator's pools
    resident = rss()
    cpu = time.process_time()
    with PeakSampler() as rounds:
        for rnd in range(2, args.rounds + 2):
            sim.step(rnd)
    per_node_round = (time.process_time() - cpu) / (n * args.rounds) * 1000
    after = rss()
    with PeakSampler() as evaluation:
        sim.evaluate()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gib = 2**30
    print(f"workload: {n} nodes, {data.n_items} items, {cfg.train.local_steps} local step(s), {cfg.gossip.exchanges} "
          f"exchanges, tracking {cfg.gossip.tracking}, moments {cfg.train.moments_dtype}, chunk {cfg.sim.chunk}, "
          f"{args.threads} thread(s), {args.rounds} timed rounds")
    print(f"CPU per node-round: {per_node_round:.2f} ms")
    print(f"resident: {before / gib:.2f} GiB before the simulation, {resident / gib:.2f} GiB after building it and "
          f"one round, {after / gib:.2f} GiB after the timed rounds; peak {peak / gib:.2f} GiB "
          + (f"[{'PASS' if peak < 20e9 else 'FAIL'}: bar < 20 GB at 10,000 nodes]" if n >= 10_000 else
             "(the bar, < 20 GB, is for 10,000 nodes)"))
    print(f"scratch above the resident state: building {(built.peak - resident) / gib:+.2f} GiB, rounds "
          f"{(rounds.peak - resident) / gib:+.2f} GiB, evaluation {(evaluation.peak - after) / gib:+.2f} GiB")
    growth = (after - before) / n
    print(f"per node: {growth / 1024:.0f} KiB resident (everything the simulation added, over {n} nodes); "
          f"adapters + optimizer state {state / 1024:.0f} KiB; ratio {growth / state:.2f}  "
          f"[{'PASS' if growth <= 3 * state else 'FAIL'}: bar <= 3x]")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--loop-rounds", type=int, default=2, help="timed rounds of the slow per-node loop")
    p.add_argument("--chunks", default="32,64,128,256", help="chunk sizes to time local training at")
    p.add_argument("--nodes", type=int, default=0, help="measure scale at this many nodes instead (see above)")
    p.add_argument("--synthetic", type=int, default=0, help="with --nodes: first write a synthetic set of this "
                                                            "many users under DATA_DIR/synthetic")
    p.add_argument("--rounds", type=int, default=3, help="with --nodes: timed rounds")
    args = p.parse_args()
    if args.nodes:
        scale(args)
        return
    cfg, data, backbone = setup(args)
    n = len(select_nodes(data, cfg))
    sim = Simulation(cfg, data, backbone, build_topology(cfg, n))
    counter = iter(range(1, 10_000))
    vec = median_time(lambda: sim.step(next(counter), vectorized=True), args.repeats, warmup=1)
    vec_train = median_time(lambda: sim.pop.train_round(next(counter), vectorized=True), args.repeats)
    loop = median_time(lambda: sim.step(next(counter), vectorized=False), args.loop_rounds, warmup=0)
    loop_train = median_time(lambda: sim.pop.train_round(next(counter), vectorized=False), args.loop_rounds, warmup=0)
    batches = median_time(lambda: [sim.pop.node_batch(i, 1, 0) for i in range(n)], args.repeats)
    round_batches = [sim.pop.node_batch(i, 1, 0) for i in range(n)]
    floor = median_time(lambda: backbone_floor(sim, round_batches, backbone.config.n_items), args.repeats)
    print(f"workload: {n} nodes, {cfg.train.local_steps} local step(s) of batch {cfg.train.batch_size} x "
          f"max_len {cfg.model.max_len}, {cfg.train.negatives} negatives, chunk {cfg.sim.chunk}, "
          f"backbone dropout {cfg.train.backbone_dropout}, {args.threads} thread(s), topology {cfg.gossip.topology}")
    print("| path | round, median s | ms per node-round | local training only, median s |\n|---|---|---|---|")
    print(f"| vectorized (hand-batched chunks) | {vec:.3f} | {vec / n * 1000:.2f} | {vec_train:.3f} |")
    print(f"| per-node loop, same code | {loop:.3f} | {loop / n * 1000:.2f} | {loop_train:.3f} |")
    ratio = loop / vec
    print(f"speed-up per round: {ratio:.1f}x  [{'PASS' if ratio >= 20 else 'FAIL'}: bar >= 20x]; "
          f"local training alone: {loop_train / vec_train:.1f}x")
    print(f"inside a vectorized round: batch building {batches:.3f} s (in training), local step "
          f"{vec_train - batches:.3f} s, mixing and the rest {vec - vec_train:.3f} s")
    print(f"floor: the frozen backbone alone, forward and backward over the same batches, {floor:.3f} s; "
          f"20x needs a whole round in {loop / 20:.3f} s ({floor / (loop / 20):.2f}x of that budget)")

    print("\n| chunk | local training, median s |\n|---|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        sim.pop.plan = replace(sim.pop.plan, chunk=chunk)
        print(f"| {chunk} | {median_time(lambda: sim.pop.train_round(next(counter)), args.repeats):.3f} |")
    sim.pop.plan = replace(sim.pop.plan, chunk=cfg.sim.chunk)
    evaluation = median_time(sim.evaluate, 3)
    print(f"\none evaluation ({'+'.join(cfg.eval.protocols)}, every {cfg.eval.every} rounds) {evaluation:.3f} s")

    small = max(50, n // 4)
    base = [f"--data-dir={args.data_dir}", f"--threads={args.threads}"] + [a for o in args.overrides for a in ("--set", o)]
    rss_small, rss_full = child_rss(base, small), child_rss(base, n)
    growth = (rss_full - rss_small) / (n - small)
    state = per_node_state_bytes(sim)
    print(f"memory: RSS after 2 rounds {rss_small / 2**20:.0f} MiB at {small} nodes, {rss_full / 2**20:.0f} MiB at {n} nodes")
    print(f"growth per extra node: {growth / 1024:.1f} KiB; adapters + optimizer state per node: {state / 1024:.1f} KiB; "
          f"ratio {growth / state:.2f}  [{'PASS' if growth <= 3 * state else 'FAIL'}: bar <= 3x]")


if __name__ == "__main__":
    main()
