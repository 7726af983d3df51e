"""``p2prec-sim``: simulate a decentralized run (or a baseline through the same runner).

With no flag but ``--data-dir`` it runs every federated user as a node on a small-world
topology, with a backbone pre-trained on the public users and cached, and writes the
results folder of docs/design.md, section 7.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2prec.cli import add_config_options, config_from_args, guarded, run_cli
from p2prec.config import METHODS
from p2prec.run.data import load_data
from p2prec.sim.device import resolve_device
from p2prec.sim.runner import run_simulation
from p2prec.topology import TopologyError


def print_summary(summary: dict, out: Path) -> None:
    print(f"\n{summary['label']}: {summary['nodes']} nodes, {summary['rounds']} rounds, "
          f"{summary['wall_s']:.0f} s; test at best-validation round {summary['best_round']}")
    print("| protocol | HR@10 | NDCG@10 | MRR |\n|---|---|---|---|")
    test = summary["test_at_best"]
    rows = [(p, m) for p, m in test.items() if p != "cold"]
    rows += [(f"{p}, cold items ({m['users']} users)", m) for p, m in test.get("cold", {}).items()]
    for protocol, m in rows:
        print(f"| {protocol} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr']:.4f} |")
    print(f"bytes sent per node per round: {summary['bytes_per_node_per_round']:.0f}; sent plus received: "
          f"{summary['bytes_sent_received_per_node_per_round']:.0f}")
    print(f"results: {out}/ (config.toml, metrics.jsonl, summary.json, convergence.png)")
    join = summary.get("join") or {}
    for c in join.get("cohorts", []):
        if c["joiners_test_ndcg@10_first_10"] is None:
            continue
        caught = c["rounds_to_founders_mean"]
        who = (f"cohort of round {c['round']}: {c['nodes']} nodes (present from round 1, the control arm)"
               if join["mode"] == "present" else
               f"joined at round {c['round']}: {c['nodes']} nodes ({join['mode']}, {c['from_neighbour']} from a "
               "neighbour)")
        print(f"{who}; test NDCG@10 over their first 10 rounds {c['joiners_test_ndcg@10_first_10']:.4f}, "
              f"founders {c['founders_test_ndcg@10_first_10']:.4f}; "
              + (f"reached the founders' after {caught} rounds" if caught else
                 f"below the founders' for all {join['window']} rounds measured"))
    if summary.get("diverged_at_round"):
        cure = "a robust.rule against the Byzantine nodes" if summary.get("byzantine") else \
            "a lower train.lr or train.shared_lr"
        print(f"p2prec-sim: warning: training diverged at round {summary['diverged_at_round']} (shared adapters "
              f"not finite) and stopped there; try {cure}", file=sys.stderr)


def cmd_sim(args: argparse.Namespace) -> int:
    overrides = []
    for flag, key in (("topology", "gossip.topology"), ("nodes", "sim.nodes"), ("rounds", "run.rounds"),
                      ("local_steps", "train.local_steps"), ("method", "run.method"), ("seed", "run.seed"),
                      ("backend", "sim.backend"), ("shards", "sim.shards"), ("ray_address", "sim.ray_address"),
                      ("device", "sim.device")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    args.overrides = overrides + list(args.overrides)
    cfg = config_from_args(args)
    resolve_device(cfg.sim.device)  # a missing CUDA device is one line now, not after data and backbone
    default_name = cfg.gossip.topology.split(':')[0].split('/')[-1] if cfg.run.method == "p2prec" else cfg.run.method
    out = Path(args.out or f"runs/{default_name}")
    try:
        if args.processes:
            from p2prec.launch import run_processes

            if args.save_states:
                raise ValueError("--save-states is for simulated runs: real nodes keep their state folders in "
                                 "node.dir/node-<id>/, which 'p2prec recommend --state' reads")

            summary = run_processes(cfg, load_data(cfg), out, args.processes, args.backbone)
        else:
            summary = run_simulation(cfg, load_data(cfg), out, args.backbone, save_states=args.save_states)
    except TopologyError as exc:
        raise ValueError(str(exc)) from None
    print_summary(summary, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2prec-sim", description=__doc__.splitlines()[0])
    add_config_options(parser)
    parser.add_argument("--topology", help="spec (small-world, ring, edge-hierarchy:m=30, ...) or topology file")
    parser.add_argument("--nodes", type=int, help="simulate a seeded subsample of this many nodes")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--seed", type=int, help="the run seed (run.seed): split, initialisation, training, gossip, faults")
    parser.add_argument("--method", choices=METHODS, help="p2prec (the default) or a baseline to compare with")
    parser.add_argument("--backbone", help="backbone folder (default: pre-train on public users, cached)")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="run N data nodes as real p2prec-node processes on 127.0.0.1 instead of simulating")
    parser.add_argument("--backend", choices=("local", "shards", "ray"),
                        help="engine: one process (default), shards in this process, or shards on Ray actors")
    parser.add_argument("--shards", type=int, help="shards of the population for --backend shards|ray (default 2)")
    parser.add_argument("--ray-address", help="Ray cluster to run on (default: start a local instance)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where the local engine's tensors live (default: cuda when present, else cpu)")
    parser.add_argument("--out", help="results folder (default: runs/<topology or method>)")
    parser.add_argument("--save-states", action="store_true",
                        help="also save every node's adapters in OUT/state, for 'p2prec recommend --state OUT'")
    parser.set_defaults(func=guarded(cmd_sim))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
