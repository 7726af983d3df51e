"""Gossip mixing: weight matrices, their masking by faults, and applying them to adapters.

One implementation serves both worlds. The simulator applies an ``N x N`` sparse matrix to
every node's stacked shared adapter in one product; a real node builds the single row for
itself (its own weight plus the neighbours that answered in time) and applies that row to
the stack of its own and received adapters, with the very same functions.

Invariant: after :func:`row_normalise` every row sums to one, so mixing is a convex
combination; a row left with no weight at all becomes the identity (the node keeps its
own state), which is how a node that heard nothing behaves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

Params = dict[str, torch.Tensor]

BLOCK_FLOATS = 1 << 22
"""Scratch floats per block of :func:`mix_into` and :func:`consensus_distance` (16 MiB): large
enough that the per-call overhead is negligible, small enough not to count against N."""

TRACK = "track."
"""Prefix of a tracker's name in a gossip message: ``track.<shared tensor name>``.

Why gossip names it: a gossiped state may carry gradient trackers beside the shared adapter,
and gossip must tell them apart (a robust rule can aggregate trackers by a rule of their own,
a joining node does not adopt another's), while learning, one floor up, fills them in."""


def row_normalise(w: sp.csr_matrix) -> sp.csr_matrix:
    """Rescale each row to sum to one; an all-zero row of a square matrix becomes ``e_i``."""
    w = sp.csr_matrix(w, dtype=np.float64)
    w.eliminate_zeros()
    empty = np.diff(w.indptr) == 0
    out = row_normalise_rect(w)
    if empty.any():
        if w.shape[0] != w.shape[1]:
            raise ValueError(f"{int(empty.sum())} rows have no weight and the matrix is not square")
        out = out + sp.diags(empty.astype(np.float64))
    return sp.csr_matrix(out)


def keep_entries(w: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """Zero the stored entries of ``w`` where ``keep`` (aligned with ``w.data``) is False."""
    out = sp.csr_matrix(w, copy=True)
    out.data = np.where(keep, out.data, 0.0)
    out.eliminate_zeros()
    return out


def entry_coords(w: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every stored entry, aligned with ``w.data``."""
    rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    return rows, w.indices


def drop_messages(w: sp.csr_matrix, p: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Lose each off-diagonal message independently with probability ``p``; keep self-weights."""
    rows, cols = entry_coords(w)
    keep = (rows == cols) | (rng.random(len(w.data)) >= p)
    return keep_entries(w, keep)


def silence_senders(w: sp.csr_matrix, silent: np.ndarray) -> sp.csr_matrix:
    """Remove every message sent by a node in ``silent`` (boolean over columns) to others."""
    rows, cols = entry_coords(w)
    return keep_entries(w, (rows == cols) | ~silent[cols])


def freeze_rows(w: sp.csr_matrix, frozen: np.ndarray) -> sp.csr_matrix:
    """Rows of ``frozen`` nodes become identity: a node that is down neither sends nor mixes."""
    keep_rows = sp.diags((~frozen).astype(np.float64))
    return sp.csr_matrix(keep_rows @ w + sp.diags(frozen.astype(np.float64)))


def uniform_peer_matrix(n: int, peers: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Epidemic-style sampling: each node pushes to ``peers`` random others this round.

    The receiver averages its own state with everything it received, uniformly.
    """
    peers = min(peers, n - 1)
    senders = np.repeat(np.arange(n), peers)
    targets = np.concatenate([_choose_others(i, n, peers, rng) for i in range(n)]) if peers else np.zeros(0, int)
    w = sp.coo_matrix((np.ones(len(senders)), (targets, senders)), shape=(n, n)) + sp.identity(n)
    return row_normalise(sp.csr_matrix(w))


def _choose_others(i: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    picks = rng.choice(n - 1, size=k, replace=False)
    return picks + (picks >= i)


def matching_matrix(edges: np.ndarray, n: int, rng: np.random.Generator) -> sp.csr_matrix:
    """A random maximal matching over ``edges`` ``[E, 2]``; matched pairs average, others keep."""
    shuffled = edges[rng.permutation(len(edges))]
    taken = [False] * n
    pairs: list[tuple[int, int]] = []
    # Plain ints in chunks: this loop may visit every edge, and it stops once at most one node
    # is left free (no edge can be added), which on a dense graph is long before the end.
    for start in range(0, len(shuffled), 4096):
        for u, v in shuffled[start:start + 4096].tolist():
            if u != v and not taken[u] and not taken[v]:
                taken[u] = taken[v] = True
                pairs.append((u, v))
        if 2 * len(pairs) >= n - 1:
            break
    a = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    rows = np.concatenate([a[:, 0], a[:, 1], a[:, 0], a[:, 1]])
    cols = np.concatenate([a[:, 1], a[:, 0], a[:, 0], a[:, 1]])
    w = sp.coo_matrix((np.full(len(rows), 0.5), (rows, cols)), shape=(n, n))
    return sp.csr_matrix(w + sp.diags(~np.asarray(taken) * 1.0))


def hypercube_matrix(labels: np.ndarray, bit: int, adjacency: sp.csr_matrix) -> sp.csr_matrix:
    """One step of hypercube gossip: the node labelled ``l`` averages with the node labelled
    ``l XOR 2**bit`` when that label exists and the two are neighbours in ``adjacency``;
    the others keep their state.

    Why this matching: over ``ceil(log2 n)`` consecutive steps, one per bit, every node's
    state becomes the exact average of all ``n`` when ``n`` is a power of two (each step
    halves what remains of the disagreement, and no pair meets twice), while a fresh random
    matching keeps pairing nodes whose states already share most of their history. Each
    step is still a perfect-or-partial matching, so a node sends one message and receives one.
    """
    n = len(labels)
    node_of = np.full(1 << max(int(n - 1).bit_length(), 1), -1, dtype=np.int64)
    node_of[labels] = np.arange(n)
    partner = node_of[labels ^ (1 << bit)]
    paired = partner >= 0
    rows = np.flatnonzero(paired)
    paired[rows] = np.asarray(adjacency[rows, partner[rows]]).ravel() != 0
    rows = np.flatnonzero(paired)
    w = sp.coo_matrix((np.full(2 * len(rows), 0.5), (np.concatenate([rows, rows]),
                                                     np.concatenate([partner[rows], rows]))), shape=(n, n))
    return sp.csr_matrix(w + sp.diags(~paired * 1.0))


def count_weighted_rows(members: list[np.ndarray], counts: np.ndarray, n: int) -> sp.csr_matrix:
    """One row per aggregator: its members weighted by their sample counts (FedAvg weights)."""
    rows = np.concatenate([np.full(len(m), r) for r, m in enumerate(members)]) if members else np.zeros(0, int)
    cols = np.concatenate(members) if members else np.zeros(0, int)
    w = sp.coo_matrix((counts[cols].astype(np.float64), (rows, cols)), shape=(len(members), n))
    return row_normalise_rect(sp.csr_matrix(w))


def row_normalise_rect(w: sp.csr_matrix) -> sp.csr_matrix:
    """Rescale each non-empty row to sum to one (rectangular matrices; empty rows stay empty)."""
    sums = np.asarray(w.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(np.where(sums > 0, 1.0 / np.where(sums > 0, sums, 1.0), 0.0)) @ w,
                         dtype=np.float64)


def flatten(params: Params, names: list[str]) -> torch.Tensor:
    """Stacked tensors ``{name: [N, ...]}`` as one ``[N, D]`` matrix, in ``names`` order."""
    return torch.cat([params[k].reshape(params[k].shape[0], -1) for k in names], dim=1)


def unflatten(flat: torch.Tensor, like: Params, names: list[str]) -> Params:
    """Inverse of :func:`flatten` for rows of ``flat``; shapes come from ``like`` (node dim first)."""
    out: Params = {}
    offset = 0
    for k in names:
        shape = like[k].shape[1:]
        size = int(np.prod(shape)) if len(shape) else 1
        out[k] = flat[:, offset:offset + size].reshape(flat.shape[0], *shape)
        offset += size
    return out


def to_torch(w: sp.spmatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy sparse matrix as a torch sparse COO tensor (the stable sparse layout)."""
    w = sp.coo_matrix(w)
    index = torch.from_numpy(np.vstack([w.row, w.col]).astype(np.int64))
    return torch.sparse_coo_tensor(index, torch.from_numpy(w.data).to(dtype), size=w.shape,
                                   check_invariants=False)


def mix(w: sp.csr_matrix | Sequence[sp.csr_matrix], params: Params, names: list[str] | None = None) -> Params:
    """``W @ X`` for stacked adapters ``X``: one sparse product per stacked tensor.

    ``W`` is ``[R, N]`` for ``N`` stacked states; the result holds ``R`` mixed states. ``W``
    may also be given as factors ``(W1, ..., Wk)`` of ``W = W1 @ ... @ Wk``, applied right to
    left. Why factors: an edge hierarchy's ``down @ across @ up`` has a few rows per aggregator
    but its product is dense within each group (a star's is N x N), so the factors are far
    cheaper. Why per tensor: a stacked tensor viewed as ``[N, D_k]`` is read in place, while
    concatenating every tensor into one ``[N, D]`` matrix and splitting the product copies each
    node's state twice; at 754 nodes of 130k values that made mixing about 2x slower. Each output
    entry sums the same terms in the same order either way, so the results are identical.
    """
    names = names or list(params)
    factors = [w] if sp.issparse(w) else list(w)
    rows = params[names[0]].shape[0]
    for factor in reversed(factors):
        if factor.shape[1] != rows:
            raise ValueError(f"mixing matrix has {factor.shape[1]} columns but {rows} states were given")
        rows = factor.shape[0]
    sparse = [to_torch(factor, params[names[0]].dtype) for factor in reversed(factors)]
    out: Params = {}
    for k in names:
        x = params[k].reshape(params[k].shape[0], -1)
        for factor in sparse:
            x = torch.sparse.mm(factor, x)
        out[k] = x.reshape(rows, *params[k].shape[1:])
    return out


def mix_into(w: sp.csr_matrix | Sequence[sp.csr_matrix], received: Params, own: Params, d: np.ndarray,
             names: list[str], echo: np.ndarray | None = None) -> None:
    """``own[k] = d * own[k] + W @ received[k] + echo * received[k]`` in place, for each of ``names``.

    ``W`` (or its factors) as in :func:`mix`, ``d`` and ``echo`` one weight per row. Why in
    place and by blocks of columns: mixing treats every column of the stacked ``[N, D]``
    states alike and apart, so it runs on one block of columns at a time, with ``N x block``
    of scratch memory instead of full-size copies of every state (at 10,000 nodes of an
    ML-1M-sized adapter with its trackers, each full copy is 7.8 GB). ``received`` may be
    ``own`` itself: a block is read whole before it is written. Each entry sums the same
    terms in the same order as :func:`mix` followed by the scaling, so the results are the same.
    """
    factors = [w] if sp.issparse(w) else list(w)
    dtype, device = own[names[0]].dtype, own[names[0]].device
    sparse = [to_torch(factor, dtype).to(device) for factor in reversed(factors)]
    scale = torch.from_numpy(np.asarray(d)).to(device, dtype).unsqueeze(1)
    back = torch.from_numpy(np.asarray(echo)).to(device, dtype).unsqueeze(1) if echo is not None else None
    for k in names:
        x = received[k].reshape(received[k].shape[0], -1)
        y = own[k].view(own[k].shape[0], -1)
        step = max(1, BLOCK_FLOATS // max(x.shape[0], 1))
        for c in range(0, x.shape[1], step):
            block = x[:, c:c + step]
            out = block
            for factor in sparse:
                out = torch.sparse.mm(factor, out)
            if back is not None:
                out = out + back * block
            y[:, c:c + step].mul_(scale).add_(out)


def consensus_distance(params: Params, names: list[str] | None = None) -> float:
    """Root-mean-square distance of the nodes' shared adapters from their average.

    Summed tensor by tensor, which gives the distance over the concatenated adapter without
    building that ``[N, D]`` copy (2x faster at 754 nodes, computed every round), and over
    blocks of nodes, so that the scratch memory is one block's, not a full-size copy.
    """
    names = names or list(params)
    total = 0.0
    for k in names:
        x = params[k].reshape(params[k].shape[0], -1)
        mean = x.mean(dim=0, keepdim=True)
        step = max(1, BLOCK_FLOATS // max(x.shape[1], 1))
        total += sum(float((x[r:r + step] - mean).pow(2).sum()) for r in range(0, x.shape[0], step))
    return math.sqrt(total / params[names[0]].shape[0])
