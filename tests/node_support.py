"""Helpers for the real-node tests: tiny configs, topology files on free ports, processes that never leak.

Every process a test starts goes through :class:`Procs`, whose ``close`` (run in a
``finally``) kills whatever is still alive, so a failing test never leaves a node behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import torch

from p2prec.config import Config, load
from p2prec.data.split import Dataset
from p2prec.model.backbone import build_backbone
from p2prec.model.store import load_backbone, save_backbone
from p2prec.run import checkpoint
from p2prec.run.checkpoint import PARAM
from p2prec.sim.engine import Simulation
from p2prec.launch import free_ports
from p2prec.topology import load as load_topology
from p2prec.topology import write
from tests.conftest import TINY

NODE_SETS = TINY + ["train.backbone_dropout=false", "eval.sampled_negatives=10", "eval.protocols=sampled",
                    "eval.select_protocol=sampled", "node.linger_ms=200"]
"""Tiny and deterministic: no backbone dropout, so real nodes and the simulator must agree."""


def make_backbone(data: Dataset, cfg: Config, folder: Path) -> Path:
    """A randomly initialised (not pre-trained) tiny backbone saved where every node can load it."""
    m = cfg.model
    save_backbone(build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, seed=2),
                  folder, data.item_ids)
    return folder


def with_addresses(graph: nx.Graph) -> nx.Graph:
    """``graph`` with a free 127.0.0.1 port as every node's address."""
    for node, port in zip(sorted(graph.nodes), free_ports(graph.number_of_nodes())):
        graph.nodes[node]["address"] = f"tcp://127.0.0.1:{port}"
    return graph


def node_config(tmp: Path, synth_dir: Path, graph: nx.Graph, extra: list[str]) -> Path:
    """Write the topology file and a resolved config for processes; return the config's path."""
    write(with_addresses(graph), tmp / "topology.json")
    cfg = load(None, NODE_SETS + [f"data.dir={synth_dir}", f"gossip.topology={tmp / 'topology.json'}",
                                  f"node.dir={tmp / 'nodes'}"] + extra)
    (tmp / "config.toml").write_text(cfg.to_toml())
    return tmp / "config.toml"


def simulate(config: Path, data: Dataset, backbone: Path, extra: list[str] = ()) -> Simulation:
    """The simulator on the same config and topology file, run for all its rounds."""
    cfg = load(config, list(extra))
    sim = Simulation(cfg, data, load_backbone(backbone, data), load_topology(cfg.gossip.topology))
    for rnd in range(1, cfg.run.rounds + 1):
        sim.step(rnd)
    return sim


def node_params(folder: Path, node: int) -> dict[str, torch.Tensor]:
    """Node ``node``'s parameters ``[1, ...]`` from its checkpoint under ``folder``."""
    tensors = checkpoint.load(folder / f"node-{node}" / checkpoint.FILE_NAME, node).tensors
    return {k[len(PARAM):]: v for k, v in tensors.items() if k.startswith(PARAM)}


def max_diff(sim: Simulation, folder: Path, nodes: list[int], names: list[str]) -> float:
    """Largest absolute difference between the simulator's and the nodes' tensors ``names``."""
    worst = 0.0
    for i in nodes:
        params = node_params(folder, i)
        for k in names:
            worst = max(worst, float((params[k][0] - sim.pop.params[k][i]).abs().max()))
    return worst


def shared_hash(folder: Path, node: int, names: list[str]) -> str:
    params = node_params(folder, node)
    digest = hashlib.sha256()
    for k in sorted(names):
        digest.update(params[k].numpy().tobytes())
    return digest.hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def rounds_done(folder: Path, node: int) -> int:
    path = folder / f"node-{node}" / "rounds.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


class Procs:
    """Node processes started by one test; :meth:`close` kills the survivors."""

    def __init__(self, config: Path, backbone: Path) -> None:
        self.config = config
        self.backbone = backbone
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs = config.parent / "logs"
        self.logs.mkdir(exist_ok=True)

    def start(self, node: int, *flags: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "p2prec.node.cli", "--config", str(self.config), "--id", str(node),
               "--backbone", str(self.backbone), *flags]
        with (self.logs / f"node-{node}.log").open("ab") as log:
            self.procs[node] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL)
        return self.procs[node]

    def log(self, node: int) -> str:
        return (self.logs / f"node-{node}.log").read_text(errors="replace")

    def wait_all(self, timeout: float) -> dict[int, int]:
        """Exit codes of every process, waiting at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        codes = {}
        for node, proc in self.procs.items():
            try:
                codes[node] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"node {node} still running after {timeout:.0f} s:\n{self.log(node)[-2000:]}")
        return codes

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
