"""Run one configured experiment end to end: topology, backbone, simulation or baseline, results.

Why one runner: ``p2prec-sim`` must put every method (``run.method``) through the
same code, data and protocol, so both call :func:`run_simulation`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from p2prec.atomic import write_text_atomic
from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.learn.baselines import run_backbone_only, run_centralized
from p2prec.learn.factories import adapter_model
from p2prec.learn.pretrain import ensure_backbone
from p2prec.run.data import select_nodes
from p2prec.run.folder import make_record, summarize_run, traffic, write_metrics, write_run
from p2prec.sim.backend import make_simulation
from p2prec.serve.state import SIM_FOLDER, fingerprint
from p2prec.serve.state import save_states as save_states_to
from p2prec.topology import load, metropolis_hastings, predicted_rate, spectral_gap, validate


def build_topology(cfg: Config, n: int):  # noqa: ANN201 - networkx.Graph or None
    """The topology for ``n`` data nodes, validated; ``None`` for local-only."""
    if cfg.run.method == "local-only":
        return None
    spec = "star" if cfg.run.method == "fedavg-server" else cfg.gossip.topology
    graph = load(spec, n, cfg.run.seed)
    validate(graph, n_data_nodes=n)
    return graph


def fix_baseline(cfg: Config) -> None:
    """Set what a baseline's protocol fixes, whatever the config says, so ``config.toml``
    records what ran: FedAvg-with-server exchanges once per round (one up, one down), since
    its server's average is exact after one and a second exchange would only repeat it."""
    if cfg.run.method == "fedavg-server":
        cfg.gossip.exchanges = 1


def run_simulation(cfg: Config, data: Dataset, out: Path, backbone_dir: str | None = None,
                   progress: bool = True, save_states: bool = False) -> dict:
    """Run the configured simulation or baseline, write ``out`` and return the summary.

    ``save_states`` also writes every node's final adapters as a state folder that
    ``p2prec recommend`` serves (``out/state``, see :mod:`p2prec.serve.state`). With late
    joiners (``sim.join``), ``out/join.jsonl`` holds their per-round measurements and the
    summary's ``join`` key compares them with the founders.
    """
    fix_baseline(cfg)
    if save_states and cfg.run.method in ("centralized", "backbone-only"):
        raise ValueError(f"--save-states: the {cfg.run.method} baseline has no nodes to save")
    if save_states and cfg.sim.backend != "local":
        raise ValueError(f"--save-states: the {cfg.sim.backend} backend keeps its nodes' adapters in its shards; "
                         "use sim.backend = 'local'")
    n = len(select_nodes(data, cfg))
    graph = build_topology(cfg, n) if cfg.run.method not in ("centralized", "backbone-only") else None
    backbone = ensure_backbone(data, cfg, backbone_dir)
    label = out.name
    start = time.perf_counter()
    extra: dict = {"label": label, "topology": cfg.gossip.topology, "mixing": cfg.gossip.mixing}
    if cfg.run.method in ("centralized", "backbone-only"):
        model = adapter_model(backbone, cfg)
        run = run_centralized(model, data, cfg) if cfg.run.method == "centralized" else \
            run_backbone_only(model, data, cfg)
        records = [make_record(r["round"], r, r.get("loss"), None, 0, run.wall_s) for r in run.records]
        rates = traffic(0, 0, n, 1)
    else:
        if graph is not None and graph.number_of_nodes() == n and cfg.gossip.mixing == "metropolis":
            w = metropolis_hastings(graph)
            extra["spectral_gap"] = spectral_gap(w)
            extra["consensus_rate_predicted"] = predicted_rate(w) ** cfg.gossip.exchanges
        backbone_sha = fingerprint(backbone) if save_states else ""  # before the adapters wrap it
        sim = make_simulation(cfg, data, backbone, graph)
        extra["message_bytes"] = sim.msg_bytes
        try:
            records = sim.run(progress=progress, label=label, on_record=lambda so_far: write_metrics(out, so_far))
        finally:
            sim.close()
        extra.update(sim.trust_summary())
        extra["consensus_by_round"] = sim.consensus
        extra["consensus_rate_measured"] = sim.measured_rate()
        extra["diverged_at_round"] = sim.diverged_at
        extra["join"] = sim.join_summary()
        if sim.join_log:
            write_text_atomic(out / "join.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in sim.join_log))
        if save_states:
            save_states_to(out / SIM_FOLDER, cfg, data, sim.pop.params, sim.nodes, max(r["round"] for r in records),
                           backbone_dir, backbone_sha)
        rates = sim.traffic(sim.diverged_at or cfg.run.rounds)
    summary = summarize_run(records, cfg, nodes=n, rounds=max(r["round"] for r in records),
                            bytes_per_node_per_round=rates["bytes_per_node_per_round"],
                            bytes_sent_received_per_node_per_round=rates["bytes_sent_received_per_node_per_round"],
                            wall_s=time.perf_counter() - start, method=cfg.run.method, **extra)
    write_run(out, cfg, records, summary)
    return summary
