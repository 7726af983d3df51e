"""A synthetic interaction log in the MovieLens-100K on-disk format, deterministic by seed.

Why planted communities: tests and demos need data where collaboration visibly helps.
Each user belongs to one community whose items form a cycle; a user walks that cycle
(next item = a few steps ahead), so sequences are predictable from the community's
shared pattern, but each user's history is too short to learn it alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2prec.atomic import write_text_atomic
from p2prec.data.items import GENRES_100K


def generate(out: str | Path, users: int = 200, items: int = 500, communities: int = 4,
             min_len: int = 8, max_len: int = 24, noise: float = 0.1, seed: int = 0) -> Path:
    """Write ``u.data`` and ``u.item`` (titles and one genre per community) to ``out``; return the folder.

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
    community = {int(i): c for c, g in enumerate(groups) for i in g}
    titles = "".join(f"{i}|Synthetic item {i} (2000)|01-Jan-2000||http://example.invalid/{i}|"
                     f"{_flags(community[i])}\n" for i in range(1, items + 1))
    write_text_atomic(folder / "u.data", "\n".join(lines) + "\n")
    write_text_atomic(folder / "u.item", titles)
    return folder


def _flags(community: int) -> str:
    """ML-100K's 19 genre flags with one genre per community (cycling past the 18 real ones), so
    an item's text says which community it belongs to, as a genre says what a film is."""
    flags = ["0"] * len(GENRES_100K)
    flags[1 + community % (len(GENRES_100K) - 1)] = "1"
    return "|".join(flags)
