"""Shared fixtures: a small synthetic data set and a tiny model config, built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from p2prec.config import Config, load
from p2prec.data import load_dataset
from p2prec.data.split import Dataset
from p2prec.data.synthetic import generate

torch.set_num_threads(2)

#: Overrides that make every model tiny, so tests train in seconds on 2 cores.
TINY = [
    "data.name=synthetic", "model.hidden=16", "model.layers=1", "model.heads=1", "model.intermediate=32",
    "model.max_len=12", "pretrain.epochs=6", "pretrain.batch_size=32", "adapter.rank_personal=4",
    "adapter.rank_shared=4", "train.lr=0.01", "eval.every=1", "eval.sampled_negatives=20",
    # One mix per round, which the hand-written references of most tests assume; the tests of
    # several exchanges (and the default's two) set gossip.exchanges themselves.
    "gossip.exchanges=1",
]


def ml100k_dir() -> Path | None:
    """The ML-100K folder under ``$P2PREC_DATA`` if it is there, else None (those tests skip)."""
    base = os.environ.get("P2PREC_DATA")
    if base and (Path(base) / "ml-100k" / "u.data").is_file():
        return Path(base) / "ml-100k"
    return None


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), users=60, items=80, communities=3, seed=7)


@pytest.fixture(scope="session")
def tiny_cfg(synth_dir: Path) -> Config:
    return load(None, TINY + [f"data.dir={synth_dir}"])


@pytest.fixture(scope="session")
def synth_data(synth_dir: Path) -> Dataset:
    return load_dataset("synthetic", str(synth_dir), 0.2, 0)


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty backbone cache, so tests never read or write the user's real cache."""
    monkeypatch.setenv("P2PREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
