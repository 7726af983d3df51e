"""Local differential privacy for the shared adapter: clip the update, add Gaussian noise, account.

What is protected (the privacy unit): a node's whole local dataset is one record, as in
user-level DP-FedAvg (McMahan et al., 2018); a node holds one user by default. Each round
the node releases its shared-adapter *update* (the delta since a reference state) after
clipping it to L2 norm ``C`` over all tensors together and adding ``N(0, (sigma C)^2)``
noise to every coordinate. That is the Gaussian mechanism with sensitivity ``C`` under
add/remove of the record (a node without data releases only noise), composed over the
rounds with sample rate 1, since every node releases every round. Under replace-one
semantics the sensitivity is ``2C``: read the epsilon of ``sigma / 2``.

The accounting is Google's ``dp-accounting`` library (its RDP accountant), not our own
maths: :func:`epsilon` gives ``(epsilon, delta)`` after R rounds, :func:`noise_for_epsilon`
calibrates ``sigma`` for a target epsilon with the library's own search.

What the caller must keep true, or the accounting does not hold:

- the reference state is a function of released values only, for example the shared
  adapter right after last round's mixing, whose inputs were all privatised messages;
- the node continues from what it released: its shared adapter becomes
  ``reference + privatize(update)`` before mixing, so that everything later (mixing,
  compression, the next round) is post-processing of released values;
- each node draws noise from its own generator, seeded independently of its data, and
  secret: a neighbour that can regenerate the noise subtracts it and reads the clipped
  update exactly, so the epsilon would mean nothing.

Where the noise comes from: a real node seeds each round's generator from the operating
system (``os.urandom``), so no one else can regenerate it (``secret=True``). The simulator
keys every node's noise by (``run.seed``, round, node id), because a simulated study must
reproduce and all its nodes run in one process where no neighbour is listening; that is
not privacy against anyone holding the config, and a real node uses it only when
``privacy.seeded_noise`` asks for it, to compare with the simulator.

What is released besides the update: nothing else data-dependent on flat gossip. In an
edge hierarchy a client's message carries its sample count in the clear, and the aggregator
weights by it; the accountant does not cover that, so real nodes refuse privacy in an edge
hierarchy rather than release it unaccounted (:class:`p2prec.node.runtime.Node`).

The functions take one node's tensors, or ``stacked=True`` tensors ``[N, ...]`` with one
row per node, where clipping is per row. :class:`LocalPrivacy` keeps those rules for the
simulator (all nodes stacked) and for a real node (a stack of one) alike: each node's
noise comes from its own generator, keyed by (seed, round, node id) only when seeded, so a
real node with seeded noise and the simulator release exactly the same values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import dp_accounting
import numpy as np
import torch
from dp_accounting.rdp import RdpAccountant

from p2prec.rng import Stream, torch_generator

if TYPE_CHECKING:
    from p2prec.config import PrivacyConfig

Tensors = Mapping[str, torch.Tensor]


def update_norms(update: Tensors, *, stacked: bool = False) -> torch.Tensor:
    """L2 norm over all tensors together: a scalar, or ``[N]`` for stacked tensors."""
    if stacked:
        squares = sum(v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in update.values())
    else:
        squares = sum(v.pow(2).sum() for v in update.values())
    return torch.as_tensor(squares).sqrt()


def clip_update(update: Tensors, clip: float, *, stacked: bool = False) -> dict[str, torch.Tensor]:
    """Scale the update (each row, if stacked) down to L2 norm ``clip`` if it is longer."""
    if clip <= 0:
        raise ValueError(f"clip norm must be positive, got {clip}")
    norms = update_norms(update, stacked=stacked)
    factor = torch.clamp(clip / torch.clamp(norms, min=torch.finfo(norms.dtype).tiny), max=1.0)
    return {name: v * factor.reshape(-1, *[1] * (v.dim() - 1)) if stacked else v * factor
            for name, v in update.items()}


def _noise(shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator],
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``; with one generator per row, row ``r`` from ``generator[r]``."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} stacked rows")
    out = torch.empty(shape, dtype=dtype)
    for row, g in enumerate(generator):
        torch.randn(shape[1:], generator=g, dtype=dtype, out=out[row])
    return out


def privatize(update: Tensors, clip: float, noise_multiplier: float,
              generator: torch.Generator | Sequence[torch.Generator], *,
              stacked: bool = False) -> dict[str, torch.Tensor]:
    """Clip to ``clip``, then add Gaussian noise of std ``noise_multiplier * clip`` per coordinate.

    Noise is drawn tensor by tensor in name order, so a seeded generator gives the same
    noise whatever order the mapping has. Stacked tensors may take one generator per row:
    then each row's noise is what that generator would give the row alone, which is how a
    node's noise stays its own whichever batch of nodes it is computed in.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be non-negative, got {noise_multiplier}")
    if not stacked and not isinstance(generator, torch.Generator):
        raise ValueError("one generator per row needs stacked tensors")
    clipped = clip_update(update, clip, stacked=stacked)
    std = noise_multiplier * clip
    return {name: clipped[name] + std * _noise(clipped[name].shape, generator, clipped[name].dtype)
            for name in sorted(clipped)}


def _event(noise_multiplier: float, rounds: int, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def _check(rounds: int, delta: float, sample_rate: float) -> None:
    if rounds < 0:
        raise ValueError(f"rounds must be non-negative, got {rounds}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")


def epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases (RDP accountant); inf without noise."""
    _check(rounds, delta, sample_rate)
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(_event(noise_multiplier, rounds, sample_rate))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier (within 1e-6) whose :func:`epsilon` is at most the target."""
    _check(rounds, delta, sample_rate)
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    if rounds == 0:
        return 0.0
    return float(dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, lambda sigma: _event(sigma, rounds, sample_rate), target_epsilon, delta))


def noise_multiplier(privacy: PrivacyConfig, rounds: int) -> float:
    """The configured noise: derived from ``privacy.target_epsilon`` over ``rounds`` when it is
    set (> 0), else ``privacy.noise_multiplier``."""
    if privacy.target_epsilon > 0:
        return noise_for_epsilon(privacy.target_epsilon, rounds, privacy.delta)
    return privacy.noise_multiplier


def snr_bound(noise_multiplier: float, rounds: int, nodes: int, dim: int) -> float:
    """An upper bound on the signal-to-noise ratio (in L2 norm) of everything the network
    releases over a run: ``sqrt(rounds * nodes) / (noise_multiplier * sqrt(dim))``.

    Why: it says, before any run, whether local DP leaves gossip anything to learn from.
    Each node releases ``clip(u) + noise_multiplier * C * z`` per round, ``z`` standard normal
    in ``dim`` dimensions. Summing all ``rounds * nodes`` releases, the best any aggregation
    can do, gives a signal of norm at most ``rounds * nodes * C`` (every clipped update equal,
    of norm C, for the whole run) and noise of norm about
    ``noise_multiplier * C * sqrt(rounds * nodes * dim)``. Below 1, even that best case is
    mostly noise; real updates disagree and change, so their sum is shorter still.
    """
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(rounds * nodes) / (noise_multiplier * math.sqrt(dim))


def noise_generator(seed: int, round_: int, node: int) -> torch.Generator:
    """Node ``node``'s noise stream for round ``round_``, keyed by nothing else (never by data)."""
    return torch_generator(seed, round_, node, Stream.DP_NOISE)


def secret_generator() -> torch.Generator:
    """A noise stream seeded from the operating system's randomness: no config, seed or
    message lets anyone else regenerate it."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class LocalPrivacy:
    """Each node's shared update clipped and noised before it leaves the node (docs/design.md, section 2).

    Holds the stacked ``[N, ...]`` shared states of the nodes ``ids`` (the simulator's
    population, or a real node's stack of one). The update is measured from a reference
    that depends on released values only: the node's shared state right after the previous
    round's mixing, whose inputs were all privatised messages (at first, the seeded
    initialisation, which saw no data). A node continues from what it released, so its
    un-noised update never reaches anything later; compression, mixing and the next round
    are post-processing, which is what makes the accountant's epsilon hold.

    ``releases`` counts the rounds in which nodes released an update; a round without
    training releases nothing data-dependent and is not counted. Each node's epsilon is at
    most :meth:`epsilon`: a node that was down released less.

    ``secret`` draws the noise from the operating system (a real node's default) instead of
    the seeded streams of :func:`noise_generator` (the simulator's, for reproducibility).
    """

    def __init__(self, cfg: PrivacyConfig, planned_releases: int, shared: Tensors, ids: Iterable[int],
                 seed: int, *, secret: bool = False) -> None:
        self.cfg = cfg
        self.seed = seed
        self.sigma = noise_multiplier(cfg, planned_releases)
        self.ids = [int(i) for i in ids]
        self.reference = {k: v.clone() for k, v in shared.items()}
        self.releases = 0
        self.secret = secret

    def release(self, shared: Tensors, round_: int, active: np.ndarray) -> None:
        """Replace the ``active`` rows of ``shared`` (in place) by reference + privatised update."""
        rows = np.flatnonzero(active)
        generators = [secret_generator() if self.secret else noise_generator(self.seed, round_, self.ids[r])
                      for r in rows]
        index = slice(None) if len(rows) == len(active) else torch.from_numpy(rows)  # a slice copies nothing
        update = {k: v[index] - self.reference[k][index] for k, v in shared.items()}
        noised = privatize(update, self.cfg.clip, self.sigma, generators, stacked=True)
        with torch.no_grad():
            for k, v in shared.items():
                v[index] = self.reference[k][index] + noised[k]
        self.releases += 1

    def rebase(self, shared: Tensors) -> None:
        """Take ``shared``, the states a round starts from (the last round's mixed states), as the
        reference of this round's update; :meth:`p2prec.gossip.stack.GossipStack.start_round` calls it."""
        self.reference = {k: v.clone() for k, v in shared.items()}

    def epsilon(self) -> float:
        """Epsilon so far at ``privacy.delta``."""
        return epsilon(self.sigma, self.releases, self.cfg.delta)
