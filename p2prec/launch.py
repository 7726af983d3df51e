"""``p2prec-sim --processes N``: the same experiment as real ``p2prec-node`` processes on 127.0.0.1.

Why: a study must switch between simulated and real networking with one flag
(docs/design.md, section 7). The launcher writes the run folder's ``config.toml`` and a ``topology.json``
whose nodes carry 127.0.0.1 addresses, starts one node process per topology node (the N
data nodes plus any aggregator-only nodes), waits for them, and merges their metrics into
the simulator's output contract (:mod:`p2prec.run.folder`). With ``security.enabled`` it
also gives every node a CurveZMQ keypair in ``keys/`` of the run folder and lists the
public keys in the topology, as an operator would for a LAN (README, "Secure your LAN").

Invariant: the launcher ends exactly the processes it started, and nothing else. On
Ctrl-C, SIGTERM or any node failing, each of its children gets SIGTERM (a node then
abandons its round and checkpoints), and any child still alive after a grace period gets
SIGKILL. Nodes run in their own sessions, so a terminal's Ctrl-C reaches them only
through the launcher.

Merged records: HR, NDCG and MRR are means over users (each node reports the mean over its
own users and how many there are) and their spread is over nodes, exactly as the simulator
summarises; coverage cannot be recombined from per-node summaries and is left out. The
consensus distance is known only where every node's shared adapter is at hand: at the end,
from the checkpoints. With privacy, a record's ``epsilon`` is the largest any node reports.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

from p2prec.atomic import write_text_atomic
from p2prec.config import Config, ConfigError
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import consensus_distance
from p2prec.learn.factories import adapter_model
from p2prec.learn.metrics import summarize
from p2prec.learn.pretrain import ensure_backbone
from p2prec.node.cli import check_config as check_node_config
from p2prec.node.runtime import METRICS, ROUNDS
from p2prec.node.security import PUBLIC_SUFFIX, SECRET_SUFFIX, generate_keys, key_name, load_public_key
from p2prec.run import checkpoint
from p2prec.run.checkpoint import PARAM
from p2prec.run.data import select_nodes
from p2prec.run.folder import summarize_run, traffic, write_run
from p2prec.sim.runner import build_topology, fix_baseline
from p2prec.topology import write

log = logging.getLogger(__name__)

GRACE_S = 15.0
"""How long stopped nodes get to checkpoint and exit before they are killed."""
POLL_S = 0.25
SIM_ONLY_FAULTS = ("drop_prob", "churn", "down", "stragglers", "byzantine")


class LaunchError(ValueError):
    """A node process failed or the run cannot be launched; the message says which and where its log is."""


def free_ports(k: int) -> list[int]:
    """``k`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(k)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def check_config(cfg: Config, processes: int) -> None:
    """Refuse what real processes cannot do; ``sim.nodes`` becomes ``processes`` and a baseline
    runs its own protocol (:func:`p2prec.sim.runner.fix_baseline`)."""
    for key in SIM_ONLY_FAULTS:
        if getattr(cfg.sim, key):
            raise ConfigError(f"sim.{key}: fault injection is simulator-only; real processes meet real faults")
    if cfg.run.method not in ("p2prec", "fedavg-server"):
        raise ConfigError(f"run.method: {cfg.run.method!r} cannot run as processes (only p2prec and fedavg-server can)")
    fix_baseline(cfg)
    check_node_config(cfg)
    if cfg.sim.nodes not in (0, processes):
        raise ConfigError(f"sim.nodes={cfg.sim.nodes} disagrees with --processes {processes}")
    cfg.sim.nodes = processes


def give_keys(graph: nx.Graph, folder: Path) -> None:
    """Put a keypair per node in ``folder`` (keeping any already there, as a rerun of the same
    run folder finds them) and its public key in the node's ``key`` attribute."""
    names = {node: key_name(node) for node in graph.nodes}
    generate_keys(folder, [n for n in names.values() if not (folder / (n + SECRET_SUFFIX)).exists()])
    for node, name in names.items():
        graph.nodes[node]["key"] = load_public_key(folder / (name + PUBLIC_SUFFIX)).decode()


def prepare(cfg: Config, data: Dataset, out: Path, processes: int) -> list[int]:
    """Write ``out/topology.json`` (127.0.0.1 addresses, and keys if secured) and ``out/config.toml``;
    return the node ids."""
    check_config(cfg, processes)
    available = len(select_nodes(data, cfg))
    if available != processes:
        raise ConfigError(f"--processes {processes}: the data set has only {available} federated nodes")
    graph = build_topology(cfg, processes)
    for node, port in zip(sorted(graph.nodes), free_ports(graph.number_of_nodes())):
        graph.nodes[node]["address"] = f"tcp://127.0.0.1:{port}"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.security.enabled:
        give_keys(graph, out / "keys")
        cfg.security.key_dir, cfg.security.secret_key = str((out / "keys").resolve()), ""
    write(graph, out / "topology.json")
    cfg.gossip.topology = str((out / "topology.json").resolve())
    cfg.node.dir = str((out / "nodes").resolve())
    write_text_atomic(out / "config.toml", cfg.to_toml())
    return sorted(graph.nodes)


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stop(procs: dict[int, subprocess.Popen]) -> None:
    """SIGTERM every child still running, wait up to :data:`GRACE_S`, then SIGKILL the rest."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_S
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(empty log)"


def _rounds_done(folder: Path, ids: list[int]) -> int:
    total = 0
    for i in ids:
        path = folder / f"node-{i}" / ROUNDS
        if path.exists():
            total += path.read_bytes().count(b"\n")
    return total


def run_nodes(out: Path, ids: list[int], rounds: int, backbone_dir: str | None, progress: bool = True,
              label: str = "processes") -> None:
    """Start one ``p2prec-node`` per id, wait for all, and end them all if anything goes wrong."""
    folder = out / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "p2prec.node.cli", "--config", str(out / "config.toml"), "--fresh"]
    if backbone_dir:
        base += ["--backbone", str(backbone_dir)]
    procs: dict[int, subprocess.Popen] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    bar = tqdm(total=len(ids) * rounds, desc=label, unit="node-round", disable=not progress, dynamic_ncols=True)
    try:
        for i in ids:
            with (folder / f"node-{i}.log").open("wb") as log_file:
                procs[i] = subprocess.Popen([*base, "--id", str(i)], stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.info("started %d node processes; logs in %s", len(procs), folder)
        while True:
            codes = {i: p.poll() for i, p in procs.items()}
            bar.update(_rounds_done(folder, ids) - bar.n)
            failed = [i for i, code in codes.items() if code not in (None, 0)]
            if failed:
                i = failed[0]
                raise LaunchError(f"node {i} exited with status {codes[i]}: "
                                  f"{_log_tail(folder / f'node-{i}.log')} (log: {folder / f'node-{i}.log'})")
            if all(code == 0 for code in codes.values()):
                return
            time.sleep(POLL_S)
    finally:
        bar.close()
        stop(procs)
        signal.signal(signal.SIGTERM, previous)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _merge_metrics(results: list[dict], users: list[int]) -> dict:
    """Per-node ``val``/``test`` results to the simulator's all-users result (see the module docstring)."""
    node_of_user = np.repeat(np.arange(len(users)), users)
    merged: dict[str, dict] = {}
    for split in ("val", "test"):
        merged[split] = {}
        for protocol, first in results[0][split].items():
            names = [k for k in first if k != "spread" and not k.startswith("coverage@")]
            per_user = {k: np.repeat([r[split][protocol][k] for r in results], users) for k in names}
            merged[split][protocol] = summarize(per_user, node_of_user)
    return merged


def merge_records(folder: Path, ids: list[int], data_nodes: int) -> list[dict]:
    """One simulator-style record per evaluated round, from every node's ``metrics.jsonl`` and ``rounds.jsonl``;
    rates per node count the ``data_nodes``, as the simulator's do (an aggregator-only node's traffic counts,
    the node does not)."""
    per_node = {i: {r["round"]: r for r in _read_jsonl(folder / f"node-{i}" / METRICS)} for i in ids}
    rounds = {i: _read_jsonl(folder / f"node-{i}" / ROUNDS) for i in ids}
    sent = {i: {r["round"]: r["bytes_sent"] for r in by} for i, by in rounds.items()}
    got = {i: {r["round"]: r.get("bytes_received", 0) for r in by} for i, by in rounds.items()}
    records = []
    for rnd in sorted({r for recs in per_node.values() for r in recs}):
        here = [recs[rnd] for recs in per_node.values() if rnd in recs]
        losses = [r["loss"] for r in here if r["loss"] is not None]
        epsilons = [r["epsilon"] for r in here if r.get("epsilon") is not None]
        records.append({
            "round": rnd,
            **_merge_metrics(here, [r["users"] for r in here]),
            "loss": float(np.mean(losses)) if losses else None,
            "consensus_distance": None,
            "bytes_sent_total": _total(sent, rnd),
            **traffic(_total(sent, rnd), _total(got, rnd), data_nodes, rnd),
            "wall_s": max(r["wall_s"] for r in here),
            "nodes_reporting": len(here),
            "epsilon": max(epsilons) if epsilons else None,
        })
    return records


def _total(per_node: dict[int, dict[int, int]], through: int) -> int:
    """Bytes over all nodes in rounds ``1..through``, from per-node ``{round: bytes}``."""
    return int(sum(b for by in per_node.values() for r, b in by.items() if r <= through))


def final_consensus(folder: Path, data_ids: list[int], shared_names: list[str]) -> float:
    """Consensus distance of the data nodes' shared adapters, read from their final checkpoints."""
    states = [checkpoint.load(folder / f"node-{i}" / checkpoint.FILE_NAME, i).tensors for i in data_ids]
    stacked = {k: torch.cat([s[PARAM + k] for s in states]) for k in shared_names}
    return consensus_distance(stacked, shared_names)


def run_processes(cfg: Config, data: Dataset, out: Path, processes: int, backbone_dir: str | None = None,
                  progress: bool = True) -> dict:
    """Run ``processes`` data nodes as real processes, write ``out`` like the simulator, return the summary."""
    start = time.perf_counter()
    spec = cfg.gossip.topology
    ids = prepare(cfg, data, out, processes)
    model = adapter_model(ensure_backbone(data, cfg, backbone_dir), cfg)
    run_nodes(out, ids, cfg.run.rounds, backbone_dir, progress, out.name)
    folder = out / "nodes"
    records = merge_records(folder, ids, processes)
    if not records:
        raise LaunchError(f"the nodes wrote no metrics; see the logs in {folder}")
    data_ids = list(range(processes))
    records[-1]["consensus_distance"] = final_consensus(folder, data_ids, model.shared_names())
    last = records[-1]
    rates = traffic(last["bytes_sent_total"], last["bytes_received_total"], processes, cfg.run.rounds)
    summary = summarize_run(records, cfg, nodes=processes, rounds=max(r["round"] for r in records),
                            bytes_per_node_per_round=rates["bytes_per_node_per_round"],
                            bytes_sent_received_per_node_per_round=rates["bytes_sent_received_per_node_per_round"],
                            wall_s=time.perf_counter() - start, method=cfg.run.method,
                            label=out.name, topology=spec, mixing=cfg.gossip.mixing,
                            processes=len(ids))
    write_run(out, cfg, records, summary)
    return summary
