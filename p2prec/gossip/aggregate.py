"""What one node computes when it aggregates: its own row of the round's mixing, applied to what it holds.

Why here, built from :mod:`p2prec.gossip.mixing`: the simulator mixes all N nodes at once
with whole matrices, while a real node knows only its own row and the states that reached
it. Every function below derives that row with the same functions the simulator applies to
the whole matrix. Those act row by row, so a node's row is, by construction, the
simulator's row for that node (``tests/test_node.py`` checks it against random masks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from p2prec.gossip.mixing import count_weighted_rows, flatten, mix, row_normalise, silence_senders, unflatten
from p2prec.gossip.robust import Aggregation, Neighbourhood
from p2prec.topology import metropolis_hastings

Arrays = Mapping[str, np.ndarray]


def heard_row(w: sp.csr_matrix, node: int, heard: Collection[int]) -> sp.csr_matrix:
    """Row ``node`` of ``row_normalise(silence_senders(w, silent))``, where everyone not in
    ``heard`` is silent: the topology's weights renormalised over the neighbours that answered.

    The node's own weight always stays, so a node that heard nobody keeps its own state.
    """
    n = w.shape[0]
    only = sp.csr_matrix(sp.diags((np.arange(n) == node).astype(np.float64)) @ w)
    silent = np.ones(n, dtype=bool)
    silent[np.fromiter(heard, dtype=np.int64, count=len(heard))] = False
    return sp.csr_matrix(row_normalise(silence_senders(only, silent))[[node]])


def count_weighted_row(members: Sequence[int], counts: Sequence[float], n: int) -> sp.csr_matrix:
    """The edge aggregator's up step over the members it heard: FedAvg weights by sample count."""
    full = np.zeros(n, dtype=np.float64)
    full[np.asarray(members, dtype=np.int64)] = counts
    return count_weighted_rows([np.asarray(members, dtype=np.int64)], full, n)


def aggregator_mixing(graph: nx.Graph, aggs: Sequence[int]) -> sp.csr_matrix:
    """Metropolis-Hastings weights on the aggregators' own graph; row ``k`` is ``aggs[k]``."""
    index = {a: k for k, a in enumerate(aggs)}
    return metropolis_hastings(nx.relabel_nodes(graph.subgraph(aggs), index))


def combine(row: sp.csr_matrix, states: Mapping[int, Arrays]) -> dict[str, torch.Tensor]:
    """``sum_j row[j] * states[j]`` through :func:`mix`, the simulator's product.

    ``states`` maps each column that carries weight to a ``name -> array`` state; received
    arrays are read-only views of network frames, so each is copied exactly once, into the
    stacked buffer the product reads.
    """
    cols = [int(j) for j in row.indices]
    missing = [j for j in cols if j not in states]
    if missing:
        raise KeyError(f"mixing row weighs states {missing} that were not given")
    first = states[cols[0]]
    stacked: dict[str, torch.Tensor] = {}
    for name, like in first.items():
        buf = np.empty((len(cols), *like.shape), dtype=np.float32)
        for r, j in enumerate(cols):
            buf[r] = states[j][name]
        stacked[name] = torch.from_numpy(buf)
    weights = sp.csr_matrix((row.data, (np.zeros(len(cols), dtype=np.int64), np.arange(len(cols)))),
                            shape=(1, len(cols)))
    return {name: value[0] for name, value in mix(weights, stacked, list(first)).items()}


def robust_combine(aggregation: Aggregation, row: sp.csr_matrix, node: int, own: Arrays,
                   received: Mapping[int, Arrays]) -> dict[str, torch.Tensor]:
    """Node ``node``'s row of :func:`p2prec.gossip.robust.robust_mix_named`: each group's rule
    over its own, true state and the states that reached it, weighted by ``row`` (e.g.
    :func:`heard_row`).

    The received states go in ascending sender order, the order in which the simulator's
    neighbourhoods hold them, so sums run in the same order too.
    """
    senders = sorted(int(j) for j in row.indices if j != node)
    weights = row.toarray()[0]
    out: dict[str, torch.Tensor] = {}
    for names, rule in aggregation.groups(list(own)):
        hood = Neighbourhood.for_node(_flat(own, names), [_flat(received[j], names) for j in senders],
                                      [weights[j] for j in senders], own_weight=float(weights[node]))
        like = {k: torch.as_tensor(np.asarray(own[k])).unsqueeze(0) for k in names}
        out.update({k: v[0] for k, v in unflatten(rule(hood), like, names).items()})
    return out


def _flat(state: Arrays, names: list[str]) -> torch.Tensor:
    """One node's tensors ``names`` as a flat vector, in the simulator's :func:`flatten` order."""
    return flatten({k: torch.as_tensor(np.asarray(state[k])).unsqueeze(0) for k in names}, names)[0]
