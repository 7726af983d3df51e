"""Shared set-up for benchmarks: data, config and backbone, resolved like the CLIs do."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from p2prec.allocator import keep_freed_memory
from p2prec.config import Config, load
from p2prec.data import load_dataset
from p2prec.data.split import Dataset
from p2prec.model.backbone import SeqRecModel
from p2prec.learn.pretrain import ensure_backbone


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=os.environ.get("P2PREC_DATA", ""),
                   help="folder holding ml-100k/ (default: $P2PREC_DATA, then the cache)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps shared machines quiet)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backbone", default="", help="backbone folder (default: the cached one for these settings)")
    return p


def setup(args: argparse.Namespace) -> tuple[Config, Dataset, SeqRecModel]:
    """Config, data and backbone, in a process set up as the CLIs set theirs up."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = load(None, [f"data.dir={args.data_dir}", *args.overrides])
    data = load_dataset(cfg.data.name, cfg.data.dir, cfg.data.public_fraction, cfg.run.seed)
    return cfg, data, ensure_backbone(data, cfg, args.backbone or None)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
