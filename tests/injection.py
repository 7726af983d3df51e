"""The injection attack on real nodes: N ``p2prec-node`` processes on 127.0.0.1, one of them a
neighbour that sends adapters filled with a constant for some rounds while keeping its own
state honest. Prints the honest nodes' final validation metric and writes the run folder
as ``p2prec-sim --processes`` does, with the relative error of the trackers' sum
(:func:`tracker_sum_error`) over all nodes and over the honest ones.

    python -m tests.injection --data-dir DATA --out runs/inject --nodes 4 --rounds 30 \\
        --fill 50 --attack-rounds 1,2 [--set robust.norm_bound=0] [--clean]

``--clean`` runs the same network with the attacker honest, the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _attacker(argv: list[str]) -> int:
    """Run ``p2prec-node`` with every outgoing state replaced by ``--fill`` in ``--attack-rounds``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fill", type=float, required=True)
    parser.add_argument("--attack-rounds", required=True)
    own, rest = parser.parse_known_args(argv)
    rounds = {int(r) for r in own.attack_rounds.split(",")}
    from p2prec.node import protocol
    from p2prec.node.cli import main

    honest = protocol.Protocol._send

    async def forged(self, peers, kind, round_, exchange, tensors, feedback=None, **meta):  # noqa: ANN001, ANN202
        if round_ in rounds:
            tensors = {k: np.full_like(np.asarray(v), own.fill) for k, v in tensors.items()}
        return await honest(self, peers, kind, round_, exchange, tensors, feedback, **meta)

    protocol.Protocol._send = forged
    return main(rest)


def tracker_sum_error(folder: Path, nodes: list[int]) -> float | None:
    """``|sum_i (y_i - g_i)| / |sum_i g_i|`` over ``nodes``' final checkpoints: how far their
    trackers' sum is from the sum of their latest (weighted) gradients, which gradient
    tracking needs to be 0 over every set of nodes that mixes only among itself (the whole
    network in a clean run). ``None`` without tracking."""
    from p2prec.learn.tracking import LAST_GRAD, TRACKER
    from p2prec.run import checkpoint
    from p2prec.run.checkpoint import OPT

    tensors = [checkpoint.load(folder / f"node-{i}" / "checkpoint.safetensors").tensors for i in nodes]
    names = [k[len(OPT + TRACKER):] for k in tensors[0] if k.startswith(OPT + TRACKER)]
    if not names:
        return None
    off = total = 0.0
    for name in names:
        y = sum(t[OPT + TRACKER + name].double() for t in tensors)
        g = sum(t[OPT + LAST_GRAD + name].double() for t in tensors)
        off += float((y - g).pow(2).sum())
        total += float(g.pow(2).sum())
    return (off / total) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--topology", default="complete")
    parser.add_argument("--attacker", type=int, default=3)
    parser.add_argument("--fill", type=float, default=50.0)
    parser.add_argument("--attack-rounds", default="1,2")
    parser.add_argument("--clean", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import logging

    from p2prec.run.data import load_data
    from p2prec.config import load
    from p2prec.learn.pretrain import ensure_backbone
    from p2prec.launch import merge_records, prepare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    cfg = load(None, [f"data.dir={args.data_dir}", f"gossip.topology={args.topology}",
                      f"run.rounds={args.rounds}", *args.overrides])
    data = load_data(cfg)
    ensure_backbone(data, cfg, None)
    ids = prepare(cfg, data, out, args.nodes)
    folder = out / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    start = time.monotonic()
    try:
        for i in ids:
            cmd = [sys.executable, "-m", "p2prec.node.cli", "--config", str(out / "config.toml"), "--fresh", "--id", str(i)]
            if i == args.attacker and not args.clean:
                cmd = [sys.executable, "-m", "tests.injection", "attacker", "--fill", str(args.fill),
                       "--attack-rounds", args.attack_rounds, *cmd[3:]]
            with (folder / f"node-{i}.log").open("wb") as log_file:
                procs[i] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        codes = {i: p.wait(timeout=3600) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    if any(codes.values()):
        raise SystemExit(f"a node failed: {codes}")
    honest = [i for i in ids if i != args.attacker]
    per_node = {}
    for i in honest:
        lines = (folder / f"node-{i}" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        per_node[i] = last["val"][cfg.eval.select_protocol][cfg.eval.select_metric]
    records = merge_records(folder, honest, len(honest))
    result = {"label": out.name, "clean": args.clean, "nodes": args.nodes, "rounds": args.rounds,
              "topology": args.topology, "attacker": args.attacker, "fill": args.fill,
              "attack_rounds": args.attack_rounds, "overrides": args.overrides,
              "final_round": records[-1]["round"],
              f"honest_val_{cfg.eval.select_protocol}_{cfg.eval.select_metric}":
                  records[-1]["val"][cfg.eval.select_protocol][cfg.eval.select_metric],
              "per_node": per_node, "wall_s": round(time.monotonic() - start, 1),
              "tracker_sum_error": {"all": tracker_sum_error(folder, ids), "honest": tracker_sum_error(folder, honest)}}
    (out / "injection.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "attacker":
        sys.exit(_attacker(sys.argv[2:]))
    sys.exit(main())
