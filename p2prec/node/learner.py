"""A data node's learned state and local work: the simulator's population, holding one node.

Why a population of one: :class:`p2prec.learn.population.Population` with ``nodes=[my
users]`` and ``ids=[my topology id]`` draws exactly the batches the simulator draws for
this node and runs the same local step on them, so a real node and the simulator cannot
disagree about the local update. Evaluation likewise goes through the simulator's
:func:`p2prec.learn.evaluate.evaluate` on an evaluation set of this node's users only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.learn.factories import configured_population, federated_eval_set
from p2prec.learn.evaluate import evaluate
from p2prec.model.adapters import DualAdapterModel
from p2prec.run.checkpoint import OPT, PARAM


class Learner:
    """Node ``node``'s adapters, optimizer state and evaluation set, for the users in ``users``;
    ``gossiped`` unless an edge aggregator averages its state (see :func:`configured_population`)."""

    def __init__(self, cfg: Config, data: Dataset, model: DualAdapterModel, users: np.ndarray, node: int,
                 gossiped: bool = True) -> None:
        self.cfg = cfg
        self.model = model
        self.users = users
        self.pop = configured_population(model, data, cfg, [users], ids=np.asarray([node]), gossiped=gossiped)
        self.eval_set = federated_eval_set(data, cfg, [users])
        self.samples = int(self.pop.counts[0])

    def train(self, round_: int) -> float:
        """Round ``round_``'s local update; the mean loss. Whether a round has one is the gossip
        stack's rule (:meth:`p2prec.gossip.stack.GossipStack.trains`), the simulator's too."""
        return self.pop.train_round(round_, vectorized=False)

    def shared(self) -> dict[str, np.ndarray]:
        """A copy of the shared adapter: safe to send while the node goes on changing its own."""
        return {k: v[0].numpy().copy() for k, v in self.pop.shared().items()}

    def set_shared(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Replace the shared adapter, copying each tensor once into the node's own storage."""
        for name, target in self.pop.shared().items():
            value = state[name]
            np.copyto(target[0].numpy(), value.numpy() if isinstance(value, torch.Tensor) else value)

    def evaluate(self) -> dict:
        return evaluate(self.model, self.pop.params, self.eval_set, tuple(self.cfg.eval.protocols),
                        stacked=True, k=self.cfg.eval.k)

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold: parameters and optimizer state, named by kind."""
        return {**{PARAM + k: v for k, v in self.pop.params.items()},
                **{OPT + k: v for k, v in self.pop.state.items()}}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state`; ``ValueError`` naming the first tensor that is missing or misshapen."""
        targets = self.state()
        unknown = sorted(set(tensors) - set(targets))
        if unknown:
            raise ValueError(f"unexpected tensor {unknown[0]!r} (the config's adapters differ)")
        for name, target in targets.items():
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r} (the config's adapters differ)")
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(target.shape)}")
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(tensors[name])
