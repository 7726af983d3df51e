"""A synthetic interaction log in the MovieLens-100K on-disk format, deterministic by seed.

Why planted communities: tests and demos need data where collaboration visibly helps.
Each user belongs to one community whose items form a cycle; a user walks that cycle
(next item = a few steps ahead), so sequences are predictable from the community's
shared pattern, but each user's history is too short to learn it alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def generate(out: str | Path, users: int = 200, items: int = 500, communities: int = 4,
             min_len: int = 8, max_len: int = 24, noise: float = 0.1, seed: int = 0) -> Path:
    """Write ``u.data`` and ``u.item`` to ``out`` and return the folder.

    ``noise`` is the probability that a step jumps to a uniformly random item.
    """
    if communities < 1 or items < 4 * communities:
        raise ValueError(f"need items >= 4 * communities, got items={items}, communities={communities}")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(items) + 1
    groups = np.array_split(order, communities)
    lines: list[str] = []
    stamp = 880_000_000
    for user in range(1, users + 1):
        cycle = groups[(user - 1) % communities]
        length = int(rng.integers(min_len, max_len + 1))
        pos = int(rng.integers(len(cycle)))
        seen: set[int] = set()
        for _ in range(length * 3):
            if len(seen) == length:
                break
            if rng.random() < noise:
                item = int(rng.integers(1, items + 1))
            else:
                pos = (pos + int(rng.integers(1, 3))) % len(cycle)
                item = int(cycle[pos])
            if item in seen:
                continue
            seen.add(item)
            stamp += int(rng.integers(1, 600))
            lines.append(f"{user}\t{item}\t{int(rng.integers(1, 6))}\t{stamp}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    titles = "".join(f"{i}|Synthetic item {i} (community {_community(i, groups)})|01-Jan-2000||\n"
                     for i in range(1, items + 1))
    _write_atomic(folder / "u.data", "\n".join(lines) + "\n")
    _write_atomic(folder / "u.item", titles)
    return folder


def _community(item: int, groups: list[np.ndarray]) -> int:
    return next(c for c, g in enumerate(groups) if item in g)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="latin-1") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
