"""Data: MovieLens loaders, the synthetic generator, splits and negative sampling."""

from __future__ import annotations

from p2prec.data.movielens import DataError, read_ratings
from p2prec.data.split import Dataset, build_dataset


def load_dataset(name: str, data_dir: str | None, public_fraction: float, seed: int,
                 min_interactions: int = 3, cold_items: float = 0.0) -> Dataset:
    """Read a data set from disk and split it (leave-one-out, public/federated, cold items)."""
    return build_dataset(read_ratings(name, data_dir), public_fraction, seed, min_interactions, cold_items)


__all__ = ["DataError", "Dataset", "build_dataset", "load_dataset", "read_ratings"]
