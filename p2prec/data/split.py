"""Leave-one-out split by timestamp, the public/federated user split, and node partition.

Why here and not in the learners: every consumer (pre-training, baselines, simulator,
real node) must see exactly the same split, so it is computed once from the config seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2prec.data.movielens import DataError, Ratings
from p2prec.rng import Stream, seeded_rng


@dataclass
class Dataset:
    """Implicit-feedback sequences with a leave-one-out split.

    Items are re-indexed ``1..n_items``; index 0 is padding. For user ``u``:
    ``train[u]`` is the time-ordered training sequence, ``val_item[u]`` the second-last
    and ``test_item[u]`` the last interaction by timestamp. ``titles[i]`` and ``texts[i]``
    describe item index ``i`` (``texts`` is empty when the data set ships no metadata).
    ``cold_items`` (item indices) appear in no training sequence and are never a training
    negative: they stand for new items, known only by their text.
    """

    n_items: int
    item_ids: np.ndarray
    user_ids: np.ndarray
    train: list[np.ndarray]
    val_item: np.ndarray
    test_item: np.ndarray
    public_users: np.ndarray
    federated_users: np.ndarray
    checksum: str
    titles: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_users(self) -> int:
        return len(self.train)

    def interacted(self, user: int) -> np.ndarray:
        """Every item the user interacted with, in any split (sorted, unique)."""
        return np.unique(np.concatenate([self.train[user], [self.val_item[user], self.test_item[user]]]))

    def nodes(self, users_per_node: int = 1) -> list[np.ndarray]:
        """Group the federated users into nodes, ``users_per_node`` consecutive users each."""
        fed = self.federated_users
        return [fed[i : i + users_per_node] for i in range(0, len(fed), users_per_node)]


def build_dataset(ratings: Ratings, public_fraction: float = 0.2, seed: int = 0,
                  min_interactions: int = 3, cold_items: float = 0.0) -> Dataset:
    """Sort each user's interactions by time, hold out the last two, split users.

    Ties in timestamp keep file order (a stable sort), so the split is deterministic.
    Users with fewer than ``min_interactions`` cannot give train, validation and test
    items and are dropped; repeated (user, item) pairs keep their first occurrence.
    A seeded fraction ``cold_items`` of the items is then removed from every training
    sequence (after the split, so validation and test items are unchanged).
    """
    if min_interactions < 3:
        raise DataError("min_interactions must be at least 3 (train, validation and test)")
    item_ids = np.unique(ratings.items)
    item_index = np.searchsorted(item_ids, ratings.items) + 1
    order = np.lexsort((np.arange(len(ratings.users)), ratings.timestamps, ratings.users))
    users_sorted = ratings.users[order]
    items_sorted = item_index[order]
    bounds = np.flatnonzero(np.diff(users_sorted)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users_sorted)]])

    user_ids: list[int] = []
    train: list[np.ndarray] = []
    val: list[int] = []
    test: list[int] = []
    for s, e in zip(starts, ends):
        seq = items_sorted[s:e]
        _, first = np.unique(seq, return_index=True)
        seq = seq[np.sort(first)]
        if len(seq) < min_interactions:
            continue
        user_ids.append(int(users_sorted[s]))
        train.append(seq[:-2].astype(np.int64))
        val.append(int(seq[-2]))
        test.append(int(seq[-1]))
    if not train:
        raise DataError(f"{ratings.source}: no user has at least {min_interactions} interactions")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train))
    n_public = int(round(public_fraction * len(train)))
    cold = _cold_items(len(item_ids), cold_items, seed)
    if len(cold):
        train = [seq[~np.isin(seq, cold)] for seq in train]
    meta = [ratings.meta.get(int(i)) for i in item_ids]
    titles = ["<pad>"] + [m.title if m else str(int(i)) for m, i in zip(meta, item_ids)]
    texts = ["<pad>"] + [m.text if m else "" for m in meta] if ratings.meta else []
    return Dataset(
        n_items=len(item_ids),
        item_ids=item_ids,
        user_ids=np.asarray(user_ids, dtype=np.int64),
        train=train,
        val_item=np.asarray(val, dtype=np.int64),
        test_item=np.asarray(test, dtype=np.int64),
        public_users=np.sort(perm[:n_public]),
        federated_users=np.sort(perm[n_public:]),
        checksum=ratings.checksum,
        titles=titles,
        texts=texts,
        cold_items=cold,
    )


def _cold_items(n_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded, sorted fraction of the item indices ``1..n_items``, drawn apart from the user split."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"cold item fraction must be in [0, 1), got {fraction}")
    count = int(round(fraction * n_items))
    rng = seeded_rng(seed, Stream.COLD_ITEMS)
    return np.sort(rng.choice(np.arange(1, n_items + 1), size=count, replace=False)).astype(np.int64)
