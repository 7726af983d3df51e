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

Run: ``python benchmarks/bench_sim.py [--data-dir DIR] [--set k=v] [--threads N] [--chunks 32,64,128,256]``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
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


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--loop-rounds", type=int, default=2, help="timed rounds of the slow per-node loop")
    p.add_argument("--chunks", default="32,64,128,256", help="chunk sizes to time local training at")
    args = p.parse_args()
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
        sim.pop.chunk = chunk
        print(f"| {chunk} | {median_time(lambda: sim.pop.train_round(next(counter)), args.repeats):.3f} |")
    sim.pop.chunk = cfg.sim.chunk
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
