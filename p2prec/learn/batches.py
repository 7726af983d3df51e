"""Turn users' private sequences into fixed-shape tensors for training and evaluation.

Why fixed shapes: the simulator stacks every node's batch into one ``[N, B, L]`` tensor,
so a node's batch must have the same shape whatever its users' history lengths.
Sequences are left-padded with item 0 so the last position is always the newest item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset


@dataclass
class TrainBatch:
    """``inputs`` ``[B, L]``, ``targets`` ``[B, L]`` (0 = no target) and ``negatives`` ``[B, L, K]``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor


def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` items of ``seq``, left-padded with zeros."""
    out = np.zeros(length, dtype=np.int64)
    tail = seq[-length:] if length else seq[:0]
    if len(tail):
        out[length - len(tail):] = tail
    return out


def train_batch(data: Dataset, sampler: NegativeSampler, users: np.ndarray, batch_size: int,
                max_len: int, negatives: int, rng: np.random.Generator) -> TrainBatch:
    """One local step's batch: ``batch_size`` training windows drawn from ``users``.

    Each row is a random window of a user's training sequence (next-item targets at every
    position); rows beyond the node's users are all padding, and contribute no loss.
    """
    inputs = np.zeros((batch_size, max_len), dtype=np.int64)
    targets = np.zeros((batch_size, max_len), dtype=np.int64)
    owners = np.zeros(batch_size, dtype=np.int64)
    chosen = rng.permutation(users)[:batch_size] if len(users) > batch_size else users
    for row, user in enumerate(chosen):
        seq = data.train[user]
        if len(seq) < 2:
            continue
        end = int(rng.integers(min(len(seq), max_len + 1), len(seq) + 1))
        window = seq[max(0, end - max_len - 1):end]
        inputs[row] = left_pad(window[:-1], max_len)
        targets[row] = left_pad(window[1:], max_len)
        owners[row] = user
    negs = sampler.sample(owners, (max_len, negatives), rng)
    negs[targets == 0] = 0
    return TrainBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(negs))


def eval_inputs(data: Dataset, users: np.ndarray, max_len: int, split: str) -> torch.Tensor:
    """History fed to the model when predicting the ``split`` ('val' or 'test') item ``[U, L]``.

    For validation the history is the training sequence; for test it also includes the
    validation item, which precedes the test item in time.
    """
    rows = []
    for user in users:
        seq = data.train[user]
        if split == "test":
            seq = np.append(seq, data.val_item[user])
        rows.append(left_pad(seq, max_len))
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, max_len), dtype=torch.long)
