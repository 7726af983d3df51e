"""``p2prec-sim``: simulate a decentralized run (or a baseline through the same runner).

With no flag but ``--data-dir`` it runs every federated user as a node on a small-world
topology, with a backbone pre-trained on the public users and cached, and writes the
results folder of DESIGN section 7.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from p2prec.cli import add_config_options, config_from_args, guarded, load_data, run_cli
from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.learn.baselines import adapter_model, run_centralized
from p2prec.model.pretrain import ensure_backbone
from p2prec.sim.engine import Simulation, select_nodes
from p2prec.sim.results import make_record, summarize_run, write_run
from p2prec.topology import TopologyError, load, metropolis_hastings, predicted_rate, spectral_gap, validate


def build_topology(cfg: Config, n: int):  # noqa: ANN201 - networkx.Graph or None
    """The topology for ``n`` data nodes, validated; ``None`` for local-only."""
    if cfg.sim.baseline == "local-only":
        return None
    spec = "star" if cfg.sim.baseline == "fedavg-server" else cfg.gossip.topology
    graph = load(spec, n, cfg.gossip.seed)
    validate(graph, n_data_nodes=n)
    return graph


def run_simulation(cfg: Config, data: Dataset, out: Path, backbone_dir: str | None = None,
                   progress: bool = True) -> dict:
    """Run the configured simulation or baseline, write ``out`` and return the summary."""
    n = len(select_nodes(data, cfg))
    graph = build_topology(cfg, n) if cfg.sim.baseline != "centralized" else None
    backbone = ensure_backbone(data, cfg, backbone_dir)
    label = out.name
    start = time.perf_counter()
    extra: dict = {"label": label, "topology": cfg.gossip.topology, "mixing": cfg.gossip.mixing}
    if cfg.sim.baseline == "centralized":
        run = run_centralized(adapter_model(backbone, cfg), data, cfg)
        records = [make_record(r["round"], r, r.get("loss"), None, 0, run.wall_s) for r in run.records]
        bytes_per_node_round = 0.0
    else:
        if graph is not None and graph.number_of_nodes() == n and cfg.gossip.mixing == "metropolis":
            w = metropolis_hastings(graph)
            extra["spectral_gap"] = spectral_gap(w)
            extra["consensus_rate_predicted"] = predicted_rate(w)
        sim = Simulation(cfg, data, backbone, graph)
        extra["message_bytes"] = sim.msg_bytes
        records = sim.run(progress=progress, label=label)
        extra["consensus_by_round"] = sim.consensus
        extra["consensus_rate_measured"] = sim.measured_rate()
        bytes_per_node_round = sim.bytes_sent_total / (n * cfg.sim.rounds)
    summary = summarize_run(records, cfg, nodes=n, rounds=max(r["round"] for r in records),
                            bytes_per_node_per_round=bytes_per_node_round,
                            wall_s=time.perf_counter() - start, baseline=cfg.sim.baseline or None, **extra)
    write_run(out, cfg, records, summary)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    print(f"\n{summary['label']}: {summary['nodes']} nodes, {summary['rounds']} rounds, "
          f"{summary['wall_s']:.0f} s; test at best-validation round {summary['best_round']}")
    print("| protocol | HR@10 | NDCG@10 | MRR |\n|---|---|---|---|")
    for protocol, m in summary["test_at_best"].items():
        print(f"| {protocol} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr']:.4f} |")
    print(f"bytes sent per node per round: {summary['bytes_per_node_per_round']:.0f}")
    print(f"results: {out}/ (config.toml, metrics.jsonl, summary.json, convergence.png)")


def cmd_sim(args: argparse.Namespace) -> int:
    overrides = []
    for flag, key in (("topology", "gossip.topology"), ("nodes", "sim.nodes"), ("rounds", "sim.rounds"),
                      ("local_steps", "train.local_steps"), ("baseline", "sim.baseline")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.seed is not None:
        overrides += [f"sim.seed={args.seed}", f"gossip.seed={args.seed}", f"train.seed={args.seed}"]
    args.overrides = overrides + list(args.overrides)
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{cfg.sim.baseline or cfg.gossip.topology.split(':')[0].split('/')[-1]}")
    try:
        summary = run_simulation(cfg, load_data(cfg), out, args.backbone)
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
    parser.add_argument("--seed", type=int, help="seed for training, gossip and faults (not the data split)")
    parser.add_argument("--baseline", choices=("local-only", "fedavg-server", "centralized"))
    parser.add_argument("--backbone", help="backbone folder (default: pre-train on public users, cached)")
    parser.add_argument("--out", help="results folder (default: runs/<topology or baseline>)")
    parser.set_defaults(func=guarded(cmd_sim))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
