"""The vectorized simulator: N nodes' local updates, then one sparse mixing product per round.

Why this shape (DESIGN section 7): one frozen backbone in memory, every node's adapters and
Adam state stacked ``[N, ...]`` (:class:`p2prec.learn.population.Population`), the local
update vmapped over chunks of nodes, and gossip as ``A @ X_sent + d * X`` on the stacked
shared adapters. The node runtime calls the same local-step and mixing functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

from p2prec.config import Config
from p2prec.data.sampler import seeded_rng
from p2prec.data.split import Dataset
from p2prec.gossip.mixing import consensus_distance, mix
from p2prec.learn.baselines import adapter_model, federated_eval_set, selection_score
from p2prec.learn.evaluate import evaluate
from p2prec.learn.population import configured_population
from p2prec.model.backbone import SeqRecModel
from p2prec.sim.faults import FaultPlan
from p2prec.sim.plan import MixingPlan
from p2prec.sim.results import make_record
from p2prec.wire import Message, MessageType, encode


def select_nodes(data: Dataset, cfg: Config) -> list[np.ndarray]:
    """All federated nodes, or a seeded subsample of ``sim.nodes`` of them (kept in id order)."""
    nodes = data.nodes(cfg.data.users_per_node)
    if cfg.sim.nodes and cfg.sim.nodes < len(nodes):
        keep = np.sort(seeded_rng(cfg.sim.seed, 0x5E1).choice(len(nodes), cfg.sim.nodes, replace=False))
        nodes = [nodes[i] for i in keep]
    return nodes


def message_bytes(shared: dict[str, torch.Tensor], round_: int = 0) -> int:
    """Bytes on the wire of one gossip message carrying ``shared``, from the real encoder."""
    tensors = {k: v.detach().contiguous().numpy() for k, v in shared.items()}
    frames = encode(Message(MessageType.GOSSIP, 0, round_, "none", tensors, {}))
    return sum(memoryview(f).nbytes for f in frames)


@dataclass
class RoundStats:
    """What one round did, for the progress bar and ``metrics.jsonl``."""

    loss: float
    consensus: float
    messages: int
    bytes_sent: int


class Simulation:
    """N simulated nodes on one backbone; :meth:`run` executes the rounds and evaluations."""

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> None:
        self.cfg = cfg
        self.data = data
        self.model = adapter_model(backbone, cfg)
        self.nodes = select_nodes(data, cfg)
        self.pop = configured_population(self.model, data, cfg, self.nodes)
        self.eval_set = federated_eval_set(data, cfg, self.nodes)
        counts = np.asarray([sum(len(data.train[u]) for u in node) for node in self.nodes], dtype=np.float64)
        self.plan = MixingPlan(graph, len(self.nodes), counts, cfg.gossip)
        self.faults = FaultPlan(cfg.sim, len(self.nodes))
        self.msg_bytes = message_bytes(self.model.shared_state())
        self.bytes_sent_total = 0
        self.consensus: list[float] = []
        self._previous_sent: dict[str, torch.Tensor] | None = None

    def step(self, rnd: int, vectorized: bool = True) -> RoundStats:
        """One round: local updates on the nodes that are up, then mixing of the shared adapters."""
        faults = self.faults.round(rnd)
        training = not self.cfg.sim.train_rounds or rnd <= self.cfg.sim.train_rounds
        loss = self.pop.train_round(rnd, active=~faults.down, vectorized=vectorized) if training else float("nan")
        own = self.pop.shared()
        names = list(own)
        sent = own
        if faults.late.any() and self._previous_sent is not None:
            late = torch.from_numpy(faults.late)
            sent = {k: torch.where(late.view(-1, *([1] * (v.dim() - 1))), self._previous_sent[k], v)
                    for k, v in own.items()}
        if self.cfg.sim.stragglers and self.cfg.sim.straggler_mode == "late":
            self._previous_sent = {k: v.clone() for k, v in own.items()}
        mixing = self.plan.round(rnd, faults)
        mixed = mix(mixing.a, sent, names)
        d = torch.from_numpy(mixing.d).to(torch.float32)
        for k in names:
            self.pop.params[k].copy_(mixed[k] + d.view(-1, *([1] * (own[k].dim() - 1))) * own[k])
        sent_bytes = mixing.messages * self.msg_bytes
        self.bytes_sent_total += sent_bytes
        self.consensus.append(consensus_distance(self.pop.shared(), names))
        return RoundStats(loss, self.consensus[-1], mixing.messages, sent_bytes)

    def measured_rate(self, skip: int = 5) -> float | None:
        """Per-round contraction of the consensus distance once training has stopped (log-linear fit)."""
        start = self.cfg.sim.train_rounds + skip
        tail = np.asarray(self.consensus[start:])
        if not self.cfg.sim.train_rounds or len(tail) < 3 or (tail <= 0).any():
            return None
        slope = np.polyfit(np.arange(len(tail)), np.log(tail), 1)[0]
        return float(np.exp(slope))

    def evaluate(self) -> dict:
        return evaluate(self.model, self.pop.params, self.eval_set, tuple(self.cfg.eval.protocols),
                        stacked=True, k=self.cfg.eval.k)

    def run(self, rounds: int | None = None, progress: bool = True, label: str = "sim") -> list[dict]:
        """Run all rounds; evaluate every ``eval.every`` rounds and at the end; return the records."""
        rounds = rounds or self.cfg.sim.rounds
        start = time.perf_counter()
        records: list[dict] = []
        best = (float("-inf"), 0)
        bar = tqdm(range(1, rounds + 1), desc=label, unit="round", disable=not progress, dynamic_ncols=True)
        for rnd in bar:
            stats = self.step(rnd)
            if not np.isfinite(stats.consensus):
                raise ValueError(f"training diverged at round {rnd} (shared adapters are not finite, loss "
                                 f"{stats.loss:.4g}): lower train.lr or train.shared_lr")
            if rnd % self.cfg.eval.every == 0 or rnd == rounds:
                result = self.evaluate()
                records.append(make_record(rnd, result, stats.loss, stats.consensus, self.bytes_sent_total,
                                           time.perf_counter() - start))
                best = max(best, (selection_score(result, self.cfg), -rnd))
            bar.set_postfix(loss=f"{stats.loss:.4f}", val=f"{best[0]:.4f}", best=-best[1])
        return records
