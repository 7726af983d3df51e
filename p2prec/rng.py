"""Every seeded random stream of a run, and the one way to open one.

Why one table: a stream is opened by integer keys (a seed, then round, node, step, ...) and
two draws that happen to use the same keys read the same numbers, silently correlating
what must be independent (which nodes fail with which peers are drawn, say). Each
independent draw therefore adds a distinct *tag* to its keys, and every tag lives in
:class:`Stream`, where ``@unique`` refuses a duplicate at import time. Keys are combined
by ``SeedSequence``, so a stream does not depend on how many draws ran before it: a real
node and the simulator draw the same numbers for the same node and round.

Untagged streams, each with keys of its own length or seed so they cannot meet the tagged
ones: a node's training batches (seed, round, node, step) and the step's dropout mask
(seed, round, step); evaluation negatives (seed, user); centralized training epochs
(seed, epoch); the data split, from the run seed alone; the synthetic data set, from the
generator's own seed.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np
import torch


@unique
class Stream(IntEnum):
    """The tag of each independent seeded draw; values are frozen, since changing one changes results."""

    NODES = 0x5E1
    """Which federated nodes a run keeps when ``sim.nodes`` subsamples them (run seed)."""
    COLD_ITEMS = 0xC01D
    """Which items are held out as cold, apart from the user split (run seed)."""
    PARTICIPATION = 0x7A1
    """Whether a node folds a fresh gradient into its tracker this round (seed, round, node)."""
    PEER_DRAW = 0x60551
    """Each round's (and exchange's) draw of gossip peers or matchings (run seed, round)."""
    DP_NOISE = 0xD9
    """A node's seeded differential-privacy noise in a round (run seed, round, node)."""
    FAULTS = 0xFA17
    """The simulator's churn: which nodes are down in a round (run seed, round)."""
    FORGERY = 0xA77
    """What the simulator's Byzantine nodes send in a round and exchange (run seed, round)."""
    JOIN = 0x70111
    """The simulator's late joiners: who joins, and which neighbour each one asks (run seed, round)."""
    BYZANTINE = 0xB12
    """Which of the simulator's nodes are Byzantine, drawn once (run seed)."""
    CLOCK = 0xC10C
    """Simulated time: each node's compute speed and each link's latency (run seed)."""


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator determined by integer keys (e.g. seed, round, node), independent of call order."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def torch_generator(*keys: int) -> torch.Generator:
    """A torch generator determined by integer keys, like :func:`seeded_rng`."""
    return torch.Generator().manual_seed(int(seeded_rng(*keys).integers(2**63)))
