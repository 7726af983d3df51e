"""The vectorized simulator: N nodes' local updates, then one sparse mixing product per exchange.

Why this shape (docs/design.md, section 7): one frozen backbone in memory, every node's adapters and
Adam state stacked ``[N, ...]`` (:class:`p2prec.learn.population.Population`), the local
update run for chunks of nodes at once by a hand-batched forward, and gossip as
``A @ X_sent + d * X`` on the stacked shared adapters. The node runtime calls the same local-step and mixing functions.

A round follows docs/design.md, section 2, for all nodes at once: local training; with privacy on,
each node's shared update is clipped and noised and the node continues from what it
released; then, once per gossip exchange (``gossip.exchanges``), what every node's neighbours
receive is built row by sender (a Byzantine node's forgery instead of its state, the codec's
decoded message, a late straggler's previous message), and mixing combines that with each
node's own, true state. With the default config (no privacy, codec ``none``, no attack,
rule ``mean``) what is received is the state itself and each exchange is exactly
``A @ X_sent + d * X``. The codec, the residual, the robust rule, privacy and which rounds
train all come from :class:`p2prec.gossip.stack.GossipStack`, as a real node's do.

In an edge hierarchy the codec and the attacks act on what clients send up; the
aggregators' own messages (across and down) are counted at the codec's size but are
modelled as exact, and a robust rule is refused, since clients there take their
aggregator's average instead of mixing neighbours.

Late joiners (``sim.join``, :class:`p2prec.sim.plan.JoinPlan`) are down until their round;
then each copies one present neighbour's shared adapter, as a real node's join request
gets it. Its gradient tracker stays zero, with a zero last gradient, like any node that has
never trained: the trackers' sum must stay the sum of the nodes' latest gradients, and a
copied tracker would add a gradient no node holds, a bias that mixing never removes. For
``sim.join_window`` rounds after joining, the joiners and the founders (the nodes present
from round 1) are evaluated every round under ``eval.select_protocol``
(:attr:`Simulation.join_log`, :meth:`Simulation.join_summary`); the consensus distance
covers present nodes only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.gossip.codecs import Codec, get_codec
from p2prec.gossip.mixing import Params, consensus_distance, mix_into
from p2prec.gossip.robust import bounded_names, robust_mix_named, state_norms
from p2prec.gossip.rounds import exchange_key
from p2prec.gossip.stack import GossipStack
from p2prec.learn.factories import adapter_model, configured_population, federated_eval_set, selection_score
from p2prec.learn.evaluate import evaluate
from p2prec.learn.population import gossip_template
from p2prec.model.backbone import SeqRecModel
from p2prec.rng import Stream, torch_generator
from p2prec.run.data import select_nodes
from p2prec.run.folder import make_record, traffic
from p2prec.sim.device import resolve_device
from p2prec.sim.attacks import byzantine_count, choose_byzantine, inject
from p2prec.sim.faults import FaultPlan, RoundFaults
from p2prec.sim.plan import JoinPlan, MixingPlan, RoundMixing, split_diagonal
from p2prec.topology import aggregators
from p2prec.wire import Message, MessageType, encode
from p2prec.wire.message import exchange_meta

PLAIN = get_codec("none")
"""float32 under the tensors' own names: what a message carries without compression."""


def message_bytes(shared: Mapping[str, torch.Tensor], codec: Codec = PLAIN, round_: int = 0,
                  exchange: int = 0) -> int:
    """Bytes on the wire of one gossip message carrying ``shared`` through ``codec`` in a round's
    ``exchange``: the real codec's payload in the real encoder's frames, so headers, scales
    and indices count (and the exchange index that later exchanges name)."""
    payload = codec.encode(shared)
    frames = encode(Message(MessageType.GOSSIP, 0, round_, codec.name, payload, exchange_meta(exchange)))
    return sum(memoryview(f).nbytes for f in frames)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-node vector ``[N]`` shaped to broadcast over a stacked tensor ``[N, ...]`` (on its device)."""
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class RoundStats:
    """What one round did, for the progress bar and ``metrics.jsonl``."""

    loss: float
    consensus: float
    messages: int
    bytes_sent: int
    bytes_received: int = 0


class Simulation:
    """N simulated nodes on one backbone; :meth:`run` executes the rounds and evaluations.

    With Byzantine nodes, metrics and the consensus distance cover the honest nodes only
    (the usual convention: an attacker's own model is not the system's quality).
    """

    def __init__(self, cfg: Config, data: Dataset, backbone: SeqRecModel, graph: nx.Graph | None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = resolve_device(cfg.sim.device)
        self.model = adapter_model(backbone.to(self.device), cfg)
        self.nodes = select_nodes(data, cfg)
        n = len(self.nodes)
        self.pop = configured_population(self.model, data, cfg, self.nodes,
                                         gossiped=graph is not None and not aggregators(graph))
        attackers = byzantine_count(cfg.sim.byzantine, n) if cfg.sim.attack != "none" else 0
        self.byzantine = choose_byzantine(n, attackers, cfg.run.seed)
        self.honest = torch.from_numpy(np.flatnonzero(~self.byzantine.numpy()))
        self.eval_set = federated_eval_set(data, cfg, [self.nodes[i] for i in self.honest.tolist()])
        self.plan = MixingPlan(graph, n, self.pop.counts, cfg.gossip, cfg.run.seed)
        self.faults = FaultPlan(cfg.sim, n, cfg.run.seed)
        self.graph = graph
        self.joins = JoinPlan(cfg.sim, n, cfg.run.seed)
        self.join_log: list[dict[str, Any]] = []
        self.join_sources: dict[int, dict[int, int]] = {}
        self._join_sets = {name: self._cohort(mask) for name, mask in
                           (("joiners", ~self.joins.founders()), ("founders", self.joins.founders()))} \
            if self.joins.cohorts else {}
        self.stack = GossipStack.from_config(cfg, self.pop.shared(), range(n))
        if self.stack.aggregation is not None and self.plan.kind == "hierarchy":
            raise ValueError(f"robust.rule = {cfg.robust.rule!r} (trackers: {cfg.robust.tracker_rule!r}) needs "
                             "flat gossip: in an edge hierarchy the clients take their aggregator's average; "
                             "use robust.rule = 'mean'")
        # Every sender's residual row is held from the start: a node that is down keeps its own.
        self.feedback = self.stack.feedback(self.pop.shared())
        template = gossip_template(self.model, cfg.gossip.tracking)
        self.msg_bytes = message_bytes(template, self.stack.codec)
        # Later exchanges name their index (one small int: the same size for every index allowed).
        self.later_msg_bytes = message_bytes(template, self.stack.codec, exchange=1)
        self.bytes_sent_total = 0
        self.bytes_received_total = 0
        self.norm_rule = self.stack.norm_rule()
        self.diverged_at: int | None = None
        self.consensus: list[float] = []
        self._previous_sent: Params | None = None

    def step(self, rnd: int, vectorized: bool = True) -> RoundStats:
        """One round: local updates on the nodes that are up, then ``gossip.exchanges`` mixings
        of the shared adapters, each under the round's faults and sending what the last produced."""
        faults = self.faults.round(rnd)
        absent = self.joins.absent(rnd)
        if absent.any():
            faults = replace(faults, down=faults.down | absent, late=faults.late & ~absent, lost=faults.lost & ~absent)
        self._join(rnd, faults.down)
        self.stack.start_round(self.pop.shared())
        training = self.stack.trains(rnd)
        loss = self.pop.train_round(rnd, active=~faults.down, vectorized=vectorized) if training else float("nan")
        own = self.pop.shared()
        names = list(own)
        self.stack.release(own, rnd, ~faults.down)
        messages = sent_bytes = received_bytes = 0
        for exchange in range(self.stack.exchanges):
            received = self._received(own, rnd, exchange, faults)
            mixing = self.plan.round(rnd, faults, exchange)
            self._mix_into(mixing, received, own, names)
            messages += mixing.messages
            size = self.later_msg_bytes if exchange else self.msg_bytes
            sent_bytes += mixing.messages * size
            received_bytes += mixing.received * size
        self.bytes_sent_total += sent_bytes
        self.bytes_received_total += received_bytes
        self.consensus.append(consensus_distance(self._honest(self.pop.shared(), ~absent), self.pop.shared_names))
        return RoundStats(loss, self.consensus[-1], messages, sent_bytes, received_bytes)

    def _join(self, rnd: int, down: np.ndarray) -> None:
        """Start round ``rnd``'s joiners from a present neighbour's shared adapter (see the module
        docstring); a joiner whose neighbours are all down or joining too starts fresh."""
        joining = self.joins.joining(rnd)
        if not len(joining):
            return
        present = ~down
        present[joining] = False
        self.join_sources[rnd] = self.joins.sources(rnd, self.graph, present)
        for node, source in self.join_sources[rnd].items():
            for k in self.pop.shared_names:
                self.pop.params[k][node] = self.pop.params[k][source]

    def _cohort(self, mask: np.ndarray) -> tuple[torch.Tensor, Any]:
        """The honest nodes of ``mask`` and their evaluation set, for the join measurements."""
        rows = torch.from_numpy(np.flatnonzero(mask & ~self.byzantine.numpy()))
        return rows, federated_eval_set(self.data, self.cfg, [self.nodes[i] for i in rows.tolist()])

    def _measure_joiners(self, rnd: int) -> None:
        """Evaluate joiners and founders at ``rnd`` if a cohort joined within ``sim.join_window`` rounds."""
        cohort = next((c for c in self.joins.cohorts if c.round <= rnd < c.round + self.joins.window), None)
        if cohort is None:
            return
        protocol = self.cfg.eval.select_protocol
        record: dict[str, Any] = {"round": rnd, "join_round": cohort.round, "rounds_joined": rnd - cohort.round + 1,
                                  "mode": self.joins.mode, "protocol": protocol}
        for name, (rows, eval_set) in self._join_sets.items():
            params = {k: v[rows] for k, v in self.pop.params.items()}
            result = evaluate(self.model, params, eval_set, (protocol,), stacked=True, k=self.cfg.eval.k)
            record[name] = {split: result[split][protocol] for split in ("val", "test")}
        self.join_log.append(record)

    def join_summary(self) -> dict[str, Any] | None:
        """The joiners against the founders, per cohort: mean test NDCG@10 of the joiners over their
        first 10 rounds (and the founders' over the same rounds), and the first round after joining
        at which the joiners' test NDCG@10 reached the founders' (None if not within the window)."""
        if not self.joins.cohorts:
            return None
        cohorts = []
        for cohort in self.joins.cohorts:
            log = [r for r in self.join_log if r["join_round"] == cohort.round]
            first = log[:10]
            caught = [r["rounds_joined"] for r in log
                      if r["joiners"]["test"]["ndcg@10"] >= r["founders"]["test"]["ndcg@10"]]
            cohorts.append({
                "round": cohort.round,
                "nodes": len(cohort.nodes),
                "from_neighbour": len(self.join_sources.get(cohort.round, {})),
                **{f"{name}_test_ndcg@10_first_10": float(np.mean([r[name]["test"]["ndcg@10"] for r in first]))
                   if first else None for name in ("joiners", "founders")},
                "rounds_to_founders_mean": caught[0] if caught else None,
            })
        return {"mode": self.joins.mode, "protocol": self.cfg.eval.select_protocol, "window": self.joins.window,
                "cohorts": cohorts}

    def _received(self, own: Params, rnd: int, exchange: int, faults: RoundFaults) -> Params:
        """What neighbours receive from each node in this exchange, one row per sender.

        A Byzantine node's forgery replaces its state, the codec's round trip gives what
        receivers decode, and a late straggler's row is its previous message (one exchange late).
        """
        sent = own
        if bool(self.byzantine.any()):
            forgery = torch_generator(self.cfg.run.seed, rnd, Stream.FORGERY, *exchange_key(exchange))
            sent = inject(self.cfg.sim.attack, sent, self.byzantine, self.cfg.sim.attack_scale, forgery)
        sent = self._compress(sent, ~faults.down)
        received = sent
        if faults.late.any() and self._previous_sent is not None:
            late = torch.from_numpy(faults.late)
            received = {k: torch.where(_rows(late, v), self._previous_sent[k], v) for k, v in sent.items()}
        if self.cfg.sim.stragglers and self.cfg.sim.straggler_mode == "late":
            self._previous_sent = {k: v.clone() for k, v in sent.items()}
        return received

    def _compress(self, sent: Params, sending: np.ndarray) -> Params:
        """Each sender's message as its receivers decode it; only ``sending`` nodes' residuals move."""
        codec = self.stack.codec
        if not codec.stages:
            return sent
        if self.feedback is None:
            return codec.roundtrip(sent)
        before = self.feedback.residual
        decoded = codec.roundtrip(sent, self.feedback)
        keep = torch.from_numpy(sending)
        self.feedback.residual = {k: torch.where(_rows(keep, v), v, before[k])
                                  for k, v in self.feedback.residual.items()}
        return decoded

    def _mix_into(self, mixing: RoundMixing, received: Params, own: Params, names: list[str]) -> None:
        """Replace the nodes' shared states ``own`` by ``A @ received + d * own``, or by the robust
        rule over the same receipt. Either way a node's own term is its true state, never the
        copy its neighbours decoded. First, on flat gossip, each node drops the received states
        beyond ``robust.norm_bound`` or over a link it cut (:class:`p2prec.gossip.robust.NormBound`,
        a real node's own check); when none is dropped, ``A`` stands bit for bit.

        Why in place (:func:`p2prec.gossip.mixing.mix_into`): at 754 nodes of 130k floats one
        stacked state is 392 MB, and mixing is bound by memory traffic, so scaling ``own`` where
        it lies and adding the product to it, a block of columns at a time, saves full-size
        temporaries per exchange. The sums are the same IEEE additions as
        ``A @ received + d * own``, so the results are bit for bit those of the plain form.
        """
        if self.plan.kind == "flat":  # as real nodes: flat gossip only (clients take their aggregator's state)
            measured = bounded_names(names)
            own_norms = state_norms(own, measured)
            sent_norms = own_norms if received is own else state_norms(received, measured)
            bounded = self.norm_rule.apply(mixing.a + sp.diags(mixing.d), sent_norms, own_norms)
            if bounded is not None:
                mixing = replace(split_diagonal(bounded), messages=mixing.messages)
        if self.stack.aggregation is not None:
            for k, v in robust_mix_named(self.stack.aggregation, mixing.a + sp.diags(mixing.d), received, own,
                                         names).items():
                own[k].copy_(v)
            return
        mix_into(mixing.factors, received, own, mixing.d, names, mixing.echo)

    def _honest(self, params: Params, present: np.ndarray | None = None) -> Params:
        """The honest nodes' rows (of those ``present``): what metrics and the consensus distance are
        computed over."""
        if present is not None and not present.all():
            rows = torch.from_numpy(np.flatnonzero(present & ~self.byzantine.numpy()))
            return {k: v[rows] for k, v in params.items()}
        if len(self.honest) == len(self.nodes):
            return params
        return {k: v[self.honest] for k, v in params.items()}

    def epsilon(self) -> float | None:
        """Each node's epsilon so far (at ``privacy.delta``), or None without privacy."""
        return self.stack.epsilon()

    def trust_summary(self) -> dict[str, Any]:
        """The summary keys of the trust settings: codec, privacy, attack and aggregation rule."""
        privacy = self.stack.privacy
        return {
            "codec": self.stack.codec.name,
            "epsilon": self.epsilon(),
            "delta": self.cfg.privacy.delta if privacy is not None else None,
            "noise_multiplier": privacy.sigma if privacy is not None else None,
            "robust_rule": self.cfg.robust.rule,
            "tracker_rule": self.cfg.robust.tracker_rule,
            "attack": self.cfg.sim.attack,
            "byzantine": int(self.byzantine.sum()),
            "evaluated_nodes": len(self.honest),
            "norm_bound": self.stack.norm_bound,
            **dict(zip(("bound_dropped", "bound_cut_links"), self.bound_counts())),
        }

    def bound_counts(self) -> tuple[int, int]:
        """Messages the norm bound has dropped so far, and links it has cut
        (:class:`p2prec.gossip.robust.NormBound`): shown, so a clean run's zero is measured."""
        return self.norm_rule.dropped, len(self.norm_rule.cut)

    def measured_rate(self, skip: int = 5) -> float | None:
        """Per-round contraction of the consensus distance once training has stopped (log-linear fit)."""
        start = self.cfg.run.train_rounds + skip
        tail = np.asarray(self.consensus[start:])
        if not self.cfg.run.train_rounds or len(tail) < 3 or (tail <= 0).any():
            return None
        slope = np.polyfit(np.arange(len(tail)), np.log(tail), 1)[0]
        return float(np.exp(slope))

    def evaluate(self) -> dict:
        """Validation and test metrics of the honest nodes' current adapters."""
        return evaluate(self.model, self._honest(self.pop.params), self.eval_set, tuple(self.cfg.eval.protocols),
                        stacked=True, k=self.cfg.eval.k)

    def close(self) -> None:
        """Release what the engine holds beyond this object: nothing in one process (a sharded
        engine stops its workers)."""

    def run(self, rounds: int | None = None, progress: bool = True, label: str = "sim",
            on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
        """Run all rounds; evaluate every ``eval.every`` rounds and at the end; return the records.

        ``on_record`` receives the records so far after each evaluation, so a long run can be
        watched (and survives being stopped) while it is still going.
        """
        rounds = rounds or self.cfg.run.rounds
        start = time.perf_counter()
        records: list[dict] = []
        best = (float("-inf"), 0)
        bar = tqdm(range(1, rounds + 1), desc=label, unit="round", disable=not progress, dynamic_ncols=True)
        for rnd in bar:
            stats = self.step(rnd)
            self._measure_joiners(rnd)
            # A diverged run is a result (an attack that wins, a step size too large): keep its
            # history, record the collapse (NaN scores rank last) and stop, rather than lose it.
            diverged = not np.isfinite(stats.consensus)
            if diverged or rnd % self.cfg.eval.every == 0 or rnd == rounds:
                result = self.evaluate()
                records.append(make_record(rnd, result, stats.loss, stats.consensus, self.bytes_sent_total,
                                           time.perf_counter() - start, epsilon=self.epsilon(),
                                           bound_dropped_total=self.bound_counts()[0], **self.traffic(rnd)))
                best = max(best, (selection_score(result, self.cfg), -rnd))
                if on_record is not None:
                    on_record(records)
            if diverged:
                self.diverged_at = rnd
                break
            kb = self.traffic(rnd)["bytes_sent_received_per_node_per_round"] / 1000
            bar.set_postfix(loss=f"{stats.loss:.4f}", val=f"{best[0]:.4f}", best=-best[1], kb_node_round=f"{kb:.1f}")
        return records

    def traffic(self, rounds: int) -> dict[str, Any]:
        """The byte keys (:func:`p2prec.run.folder.traffic`) over the first ``rounds`` rounds."""
        return traffic(self.bytes_sent_total, self.bytes_received_total, len(self.nodes), rounds)
