"""A node's gossip stack: everything the config says about how a round's states travel and mix.

Why one object: the simulator (all nodes stacked ``[N, ...]``) and a real node (a stack of
one) must apply the same codec, the same residual rule, the same robust rule and norm
bound, the same local privacy at the same point of the round, and the same schedule of
exchanges and training rounds. Each used to build these from the config itself, so a new
codec or rule had to be wired twice and the two could drift apart. Both now call
:meth:`GossipStack.from_config` and nothing else.

What holds for a stack, and what its users rely on:

- ``codec`` encodes every message of the network; every node builds it from the same
  config, so a receiver decodes exactly what a sender encoded.
- A sender keeps an error-feedback residual exactly when :meth:`Codec.keeps_residual` says
  so for ``gossip.tracking`` (:meth:`feedback`); it belongs to the sender and never travels.
- ``aggregation`` is ``None`` when both robust rules are ``mean`` (plain mixing, the same
  result); ``norm_bound`` (``robust.norm_bound``, 0 for off) applies before any rule, with
  the cuts of ``robust.quarantine`` (:meth:`norm_rule`).
- ``privacy`` is ``None`` unless ``privacy.enabled`` and the stack holds states with data.
  Its reference is the shared state a round starts from: :meth:`start_round` takes it
  right before the local update, and :meth:`release` replaces the update by its
  privatised form right after, in training rounds only. The state a round starts from is
  the last round's mixed state (or, for a joiner, the state it adopted), a function of
  released values only, which is what :mod:`p2prec.gossip.privacy` requires. Taking it at
  the start of the round rather than at the end of the last one is the same state in the
  simulator, and it is also right for a real node after a restart or a join, which never
  ran the last round's end.
- A round trains while ``run.train_rounds`` is 0 or not yet passed (:meth:`trains`); the
  noise is calibrated over the rounds that train (:meth:`training_rounds`), which are also
  the rounds in which a node releases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from p2prec.config import Config
from p2prec.gossip.async_rule import check_async
from p2prec.gossip.codecs import Codec, ErrorFeedback, codec_from_config
from p2prec.gossip.privacy import LocalPrivacy
from p2prec.gossip.robust import Aggregation, NormBound, aggregation_from_config

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class GossipStack:
    """The codec, residual rule, robust rule, local privacy and round schedule of one config
    (see the module docstring for what each guarantees)."""

    codec: Codec
    residual: bool
    """Whether a sender keeps an :class:`ErrorFeedback` (see :meth:`feedback`)."""
    aggregation: Aggregation | None
    norm_bound: float
    exchanges: int
    train_rounds: int
    privacy: LocalPrivacy | None = None
    quarantine: bool = True

    @classmethod
    def from_config(cls, cfg: Config, shared: Tensors | None = None, ids: Iterable[int] = (), *,
                    secret: bool = False) -> GossipStack:
        """The stack ``cfg`` describes, for the nodes ``ids`` whose stacked shared states are ``shared``.

        ``shared`` is ``None`` where no state with data is held (an aggregator-only node, or a
        command that only needs the rules): then there is no privacy. ``secret`` draws the
        privacy noise from the operating system instead of the seeded streams
        (:class:`LocalPrivacy`); only a real node's noise can be secret.
        """
        check_async(cfg)
        codec = codec_from_config(cfg.gossip)
        stack = cls(codec, codec.keeps_residual(cfg.gossip.tracking), aggregation_from_config(cfg.robust),
                    cfg.robust.norm_bound, cfg.gossip.exchanges, cfg.run.train_rounds,
                    quarantine=cfg.robust.quarantine)
        if not cfg.privacy.enabled or shared is None:
            return stack
        privacy = LocalPrivacy(cfg.privacy, stack.training_rounds(cfg.run.rounds), shared, ids, cfg.run.seed,
                               secret=secret)
        return replace(stack, privacy=privacy)

    def norm_rule(self) -> NormBound:
        """A fresh run's norm bound: one per real node, one for all the simulator's nodes."""
        return NormBound(self.norm_bound, self.quarantine)

    def trains(self, round_: int) -> bool:
        """Whether round ``round_`` has a local update (none once ``run.train_rounds`` have passed)."""
        return not self.train_rounds or round_ <= self.train_rounds

    def training_rounds(self, through: int) -> int:
        """How many of rounds ``1..through`` :meth:`trains`: a node's releases by then."""
        return min(self.train_rounds or through, through)

    def feedback(self, like: Tensors | None = None) -> ErrorFeedback | None:
        """A fresh sender's residual, ``None`` when the codec keeps none. ``like`` gives it zeros
        of those (stacked) shapes from the start, for a caller that keeps some senders' rows
        while others send; otherwise it stays empty until the first encode."""
        if not self.residual:
            return None
        return ErrorFeedback({k: torch.zeros_like(v) for k, v in like.items()} if like is not None else {})

    def start_round(self, shared: Tensors) -> None:
        """Take ``shared``, the states this round starts from, as privacy's reference (no-op without privacy)."""
        if self.privacy is not None:
            self.privacy.rebase(shared)

    def release(self, shared: Tensors, round_: int, active: np.ndarray) -> None:
        """After the local update of a round that :meth:`trains`, replace the ``active`` rows of
        ``shared`` (in place) by what they release (no-op without privacy)."""
        if self.privacy is not None and self.trains(round_):
            self.privacy.release(shared, round_, active)

    def epsilon(self) -> float | None:
        """Each node's epsilon so far (at ``privacy.delta``), or ``None`` without privacy."""
        return self.privacy.epsilon() if self.privacy is not None else None
