"""Evaluation under both protocols of docs/design.md section 4, for one model or many nodes at once.

- ``sampled``: the held-out item against 99 negatives the user never interacted with, drawn
  once per user with a fixed seed (198 items: the first 99 for validation, the last 99 for
  test), as in PFedRec, so numbers compare with the literature.
- ``full``: the held-out item against every item the user has not interacted with.

Why one code path for a single model and for stacked node adapters: the centralized
baseline, a real node and the simulator must score users identically; a single set of
parameters is simply evaluated with ``stacked=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.batches import eval_inputs
from p2prec.learn.metrics import item_coverage, metrics_from_ranks, rank_of_first, summarize
from p2prec.learn.local import Params
from p2prec.model.backbone import SeqRecModel
from p2prec.rng import seeded_rng

SPLITS = ("val", "test")
#: Key of the test rows restricted to users whose held-out item is cold: ``test[COLD][protocol]``.
COLD = "cold"
#: Upper bound on candidate-embedding floats materialised per scoring call (memory guard).
_FLOAT_BUDGET = 24_000_000


@dataclass
class EvalSet:
    """Everything needed to evaluate a fixed set of users grouped into nodes.

    ``users[i, j]`` is the j-th user of node i (padded by repeating a node's first user;
    ``real[i, j]`` marks genuine entries). ``cold`` flags, per flattened user, a test item
    that is a cold item (held out of all training).
    """

    users: np.ndarray
    real: np.ndarray
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    negatives: dict[str, torch.Tensor]
    interacted: list[np.ndarray]
    n_items: int
    cold: np.ndarray


def build_eval_set(data: Dataset, nodes: list[np.ndarray], max_len: int, n_negatives: int = 99,
                   seed: int = 0) -> EvalSet:
    """Pre-compute inputs, targets and the seeded sampled negatives for every node's users.

    The negatives come from items the user never rated in any split, drawn per user from
    ``(seed, user)`` alone, so every run and every code path ranks against the same items.
    """
    sampler = NegativeSampler(data, held_out=True)
    width = max(len(u) for u in nodes)
    users = np.stack([np.concatenate([u, np.full(width - len(u), u[0])]) for u in nodes])
    real = np.stack([np.arange(width) < len(u) for u in nodes])
    flat = users.reshape(-1)
    drawn = np.stack([sampler.distinct(int(u), 2 * n_negatives, seeded_rng(seed, int(u))) for u in flat])
    shape = users.shape
    inputs = {s: eval_inputs(data, flat, max_len, s).reshape(*shape, max_len) for s in SPLITS}
    targets = {
        "val": torch.from_numpy(data.val_item[flat]).reshape(shape),
        "test": torch.from_numpy(data.test_item[flat]).reshape(shape),
    }
    negatives = {
        "val": torch.from_numpy(drawn[:, :n_negatives]).reshape(*shape, n_negatives),
        "test": torch.from_numpy(drawn[:, n_negatives:]).reshape(*shape, n_negatives),
    }
    interacted = [data.interacted(int(u)) for u in flat]
    cold = np.isin(data.test_item[flat], data.cold_items)
    return EvalSet(users, real, inputs, targets, negatives, interacted, data.n_items, cold)


def _scores(model: nn.Module, params: Params, inputs: torch.Tensor, candidates: torch.Tensor,
            stacked: bool) -> torch.Tensor:
    """Scores ``[n, U, C]`` for node inputs ``[n, U, L]``; params stacked ``[n, ...]`` or shared."""
    n, u = inputs.shape[:2]
    if stacked:
        return torch.func.vmap(lambda p, x, c: functional_call(model, p, (x, c)))(params, inputs, candidates)
    flat = functional_call(model, params, (inputs.reshape(n * u, -1), candidates.reshape(n * u, -1)))
    return flat.reshape(n, u, -1)


def _chunks(total: int, per_item: int) -> list[slice]:
    step = max(1, _FLOAT_BUDGET // max(per_item, 1))
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


@dataclass
class UserRanks:
    """Every genuine user's 0-based rank of the held-out item, per ``(split, protocol)``.

    Why apart from the summary: a population split into shards ranks its users shard by
    shard, and :func:`summarize_ranks` of the concatenated ranks (:func:`concat_ranks`) is
    exactly the summary of one evaluation over all of them. ``tops`` holds each user's
    top-k items under the full protocol (test split) for the coverage, ``None`` without it.
    """

    ranks: dict[tuple[str, str], np.ndarray]
    node_of_user: np.ndarray
    cold: np.ndarray
    tops: np.ndarray | None
    n_items: int
    nodes: int


@torch.no_grad()
def rank_users(model: nn.Module, params: Params, es: EvalSet, protocols: tuple[str, ...] = ("sampled", "full"),
               stacked: bool = False, k: int = 10) -> UserRanks:
    """The ranks :func:`evaluate` summarizes (same arguments)."""
    n_nodes, width = es.users.shape
    hidden = (model.config if isinstance(model, SeqRecModel) else model.backbone.config).hidden
    ranks: dict[tuple[str, str], list[np.ndarray]] = {}
    tops: list[np.ndarray] = []
    all_items = torch.arange(1, es.n_items + 1)
    for split in SPLITS:
        for protocol in protocols:
            cols = 1 + (es.negatives[split].shape[-1] if protocol == "sampled" else es.n_items)
            out: list[np.ndarray] = []
            for sl in _chunks(n_nodes, width * cols * hidden):
                p = {name: t[sl] for name, t in params.items()} if stacked else params
                target = es.targets[split][sl]
                if protocol == "sampled":
                    cands = torch.cat([target.unsqueeze(-1), es.negatives[split][sl]], dim=-1)
                else:
                    cands = torch.cat([target.unsqueeze(-1), all_items.expand(*target.shape, -1)], dim=-1)
                device = next(iter(p.values())).device
                scores = _scores(model, p, es.inputs[split][sl].to(device), cands.to(device),
                                 stacked).reshape(-1, cols).cpu()
                valid = None
                if protocol == "full":
                    valid = _full_mask(es, sl, width)
                    if split == "test":
                        masked = scores[:, 1:].masked_fill(~valid[:, 1:], float("-inf"))
                        tops.append(masked.topk(k, dim=1).indices.numpy() + 1)
                out.append(rank_of_first(scores, valid).numpy())
            ranks[(split, protocol)] = np.concatenate(out)
    real = es.real.reshape(-1)
    return UserRanks({key: r[real] for key, r in ranks.items()}, np.repeat(np.arange(n_nodes), width)[real],
                     es.cold[real], np.concatenate(tops)[real] if tops else None, es.n_items, n_nodes)


def concat_ranks(parts: list[UserRanks]) -> UserRanks:
    """The ranks of several disjoint groups of nodes as one population, nodes in ``parts`` order."""
    offsets = np.cumsum([0] + [p.nodes for p in parts])
    tops = [p.tops for p in parts if p.tops is not None]
    return UserRanks({key: np.concatenate([p.ranks[key] for p in parts]) for key in parts[0].ranks},
                     np.concatenate([p.node_of_user + off for p, off in zip(parts, offsets)]),
                     np.concatenate([p.cold for p in parts]), np.concatenate(tops) if tops else None,
                     parts[0].n_items, int(offsets[-1]))


def summarize_ranks(r: UserRanks, protocols: tuple[str, ...], k: int = 10) -> dict[str, dict]:
    """The metrics of :func:`evaluate` from ranks: means over users, spread over nodes, coverage, cold items."""
    result: dict[str, dict] = {split: {} for split in SPLITS}
    for (split, protocol), ranks in r.ranks.items():
        result[split][protocol] = summarize(metrics_from_ranks(ranks, k), r.node_of_user)
    if r.tops is not None:
        result["test"]["full"][f"coverage@{k}"] = item_coverage(r.tops, r.n_items)
    if r.cold.any():
        result["test"][COLD] = {protocol: {name: float(v.mean()) for name, v in
                                           metrics_from_ranks(r.ranks[("test", protocol)][r.cold], k).items()}
                                | {"users": int(r.cold.sum())} for protocol in protocols}
    return result


def evaluate(model: nn.Module, params: Params, es: EvalSet, protocols: tuple[str, ...] = ("sampled", "full"),
             stacked: bool = False, k: int = 10) -> dict[str, dict]:
    """Metrics for every split and protocol: ``{"val": {"sampled": {...}, "full": {...}}, "test": ...}``.

    With ``stacked=True``, ``params`` holds one set of adapters per node ``[N, ...]``, in
    the order of ``es.users``. ``model`` must be in eval mode.
    """
    return summarize_ranks(rank_users(model, params, es, protocols, stacked, k), protocols, k)


def _full_mask(es: EvalSet, sl: slice, width: int) -> torch.Tensor:
    """Valid columns for the full protocol: the target plus every non-interacted item."""
    start, stop = sl.start * width, sl.stop * width
    valid = torch.ones(stop - start, 1 + es.n_items, dtype=torch.bool)
    for row, flat_index in enumerate(range(start, stop)):
        valid[row, torch.from_numpy(es.interacted[flat_index])] = False
    valid[:, 0] = True
    return valid
