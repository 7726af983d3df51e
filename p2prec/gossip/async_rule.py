"""Asynchronous gossip: mix the freshest state held from each neighbour, with bounded staleness.

The rule. A node loops on its own clock: one local update, then it sends its trained shared
adapter to every neighbour, then it replaces its shared adapter by

    x_i <- W_ii' x_i + sum_j W_ij' x_j^held

where ``x_j^held`` is the last state that arrived from neighbour ``j`` and ``W'`` is row ``i``
of the topology's Metropolis-Hastings matrix renormalised over the neighbours whose held
state is fresh (:func:`p2prec.gossip.aggregate.heard_row`, the sync node's rule for who
answered). A held state is fresh for ``gossip.max_staleness`` of the receiver's own updates
after it arrived, then dropped; the node's own weight always stays.

Why this rule and its guarantee: it is the partially asynchronous averaging iteration of
Bertsekas and Tsitsiklis (Parallel and Distributed Computation, 1989, section 7.3): every
node updates from delayed copies of its neighbours' values, with weights bounded below, a
positive self-weight and delays bounded by ``max_staleness`` local updates, and under those
conditions the nodes reach consensus geometrically fast. Folding an SGD step into each update
gives the bounded-staleness decentralized SGD of AD-PSGD (Lian et al., ICML 2018), which
converges at the rate of synchronous decentralized SGD when staleness is bounded. Why not
push-sum, which also handles directed graphs: push-sum is exact only while every pushed
share of mass is counted exactly once, so a message lost in a crash, or a node restarted
from a checkpoint that re-sends its last share, biases the average for good. The rule
here holds states, not shares: receiving a state twice, or losing one, changes nothing
beyond that one mix, so crash, restart and message loss cost nothing lasting. The price:
the consensus point is not exactly the initial average (MH weights are symmetric, but nodes
mix at different times), which SGD's own noise dominates.

Gradient tracking is off in async mode (``gossip.tracking = false`` is required): its
invariant, that the trackers sum to the sum of the nodes' latest gradients, holds only
when every node mixes the same round's trackers through a doubly stochastic matrix; with
stale, renormalised rows the trackers' sum drifts and the drift is never corrected
(asynchronous variants need push-sum's exact mass bookkeeping, which crashes break; see
above). ``gossip.exchanges`` is not used: each update mixes once.

One implementation: the event-driven simulator (:mod:`p2prec.sim.events`, its held items
are version numbers) and the real node (:mod:`p2prec.node.async_loop`, its held items are
messages) both keep a :class:`Freshest` per node and mix with :func:`mixing_row`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

import scipy.sparse as sp

from p2prec.config import Config, ConfigError
from p2prec.gossip.aggregate import heard_row

T = TypeVar("T")


def check_async(cfg: Config) -> None:
    """Refuse what async mode does not implement, naming the key. One default is not refused but
    not applied either: ``robust.norm_bound`` (on by default in sync mode) bounds no async mix yet,
    so an async network has no bounded influence against a forging neighbour (README, Limits)."""
    if cfg.gossip.mode != "async":
        return
    need = {"gossip.tracking": (cfg.gossip.tracking, False), "gossip.mixing": (cfg.gossip.mixing, "metropolis"),
            "gossip.codec": (cfg.gossip.codec, "none"), "robust.rule": (cfg.robust.rule, "mean"),
            "privacy.enabled": (cfg.privacy.enabled, False), "train.lr_schedule": (cfg.train.lr_schedule, "constant")}
    for key, (value, wanted) in need.items():
        if value != wanted:
            raise ConfigError(f"{key}: gossip.mode = 'async' supports only {wanted!r} so far, got {value!r}"
                              + (" (gradient tracking needs synchronous mixing; see p2prec.gossip.async_rule)"
                                 if key == "gossip.tracking" else ""))


@dataclass(frozen=True)
class Held(Generic[T]):
    """The last state heard from one neighbour: the receiver's update count when it arrived
    (``stamp``), the sender's update index, and the state itself (or a reference to it)."""

    stamp: int
    update: int
    item: T


class Freshest(Generic[T]):
    """One node's freshest state from each neighbour, and its own count of completed updates.

    The latest arrival from a sender replaces the one held, whatever update index it names:
    a sender restarted from a checkpoint repeats indices, and messages over one connection
    arrive in order, so arrival order is the truth and a forged index cannot pin a state.
    """

    def __init__(self, max_staleness: int, updates: int = 0) -> None:
        self.max_staleness = max_staleness
        self.updates = updates
        self.held: dict[int, Held[T]] = {}

    def arrive(self, sender: int, update: int, item: T) -> None:
        self.held[sender] = Held(self.updates, update, item)

    def fresh(self) -> dict[int, Held[T]]:
        """The held states younger than ``max_staleness`` of this node's updates: what the next mix uses."""
        return {j: h for j, h in self.held.items() if self.updates - h.stamp < self.max_staleness}

    def advance(self) -> None:
        """Count one completed update and forget the states that can no longer be mixed."""
        self.updates += 1
        self.held = self.fresh()


def mixing_row(w: sp.csr_matrix, me: int, senders: Collection[int]) -> sp.csr_matrix:
    """Row ``me`` of ``w`` renormalised over ``me`` and the ``senders`` whose fresh states it mixes."""
    return heard_row(w, me, senders)
