"""Readers for the MovieLens file formats, with errors that name the file and line.

Why a reader per format instead of pandas: the files are simple, the project should not
pull a data-frame library for three formats, and a malformed line must be reported as
``path:line: problem`` rather than as a parser stack trace.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2prec.data.errors import DataError
from p2prec.data.items import ItemMeta, read_items

#: The ratings file that identifies each on-disk format. ``synthetic`` uses the ml-100k format.
RATINGS_FILE: dict[str, str] = {
    "ml-100k": "u.data",
    "synthetic": "u.data",
    "ml-1m": "ratings.dat",
    "ml-latest": "ratings.csv",
}

#: Folder names a data set is found under, beside its own name (GroupLens's archive names).
ALIASES: dict[str, tuple[str, ...]] = {"ml-latest": ("ml-latest-small",)}


@dataclass
class Ratings:
    """Raw interactions as parallel arrays, in file order, plus the item metadata found beside them."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    source: Path
    checksum: str
    meta: dict[int, ItemMeta] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Where downloaded data and pre-trained backbones live when no path is given."""
    if os.environ.get("P2PREC_CACHE"):
        return Path(os.environ["P2PREC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2prec"


def locate(name: str, data_dir: str | Path | None = None) -> Path:
    """Find the folder holding ``name``'s ratings file.

    Looks at ``data_dir`` (the folder itself or its ``name`` subfolder), then
    ``$P2PREC_DATA``, then the cache directory, and never downloads anything.
    """
    if name not in RATINGS_FILE:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(RATINGS_FILE)})")
    wanted = RATINGS_FILE[name]
    candidates: list[Path] = []
    if data_dir:
        candidates.append(Path(data_dir))
    elif os.environ.get("P2PREC_DATA"):
        candidates.append(Path(os.environ["P2PREC_DATA"]))
    else:
        candidates.append(default_cache_dir() / "data")
    for base in candidates:
        for folder in (base, base / name, *(base / alias for alias in ALIASES.get(name, ()))):
            if (folder / wanted).is_file():
                return folder
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"no {wanted} for data set {name!r} under {tried}; pass --data-dir, set $P2PREC_DATA, "
        f"or run 'p2prec data download {name}' on a machine with internet"
    )


def file_checksum(path: Path) -> str:
    """MD5 of a file: the cache key for backbones pre-trained on it (not a security check)."""
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_rows(path: Path, sep: str, skip_header: bool, encoding: str) -> np.ndarray:
    """Parse ``user sep item sep rating sep timestamp`` rows into an int64 array [n, 3]."""
    rows: list[tuple[int, int, int]] = []
    try:
        with path.open("r", encoding=encoding) as fh:
            for lineno, line in enumerate(fh, start=1):
                if skip_header and lineno == 1:
                    continue
                line = line.strip()
                if not line:
                    continue
                parts = line.split(sep)
                if len(parts) != 4:
                    raise DataError(f"{path}:{lineno}: expected 4 fields separated by {sep!r}, got {len(parts)}")
                try:
                    user, item = int(parts[0]), int(parts[1])
                    float(parts[2])
                    stamp = int(float(parts[3]))
                except ValueError:
                    raise DataError(f"{path}:{lineno}: non-numeric field in {line[:80]!r}") from None
                if user < 0 or item < 0:
                    raise DataError(f"{path}:{lineno}: negative user or item id")
                rows.append((user, item, stamp))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not {encoding} text ({exc.reason})") from None
    if not rows:
        raise DataError(f"{path}: no ratings found")
    return np.asarray(rows, dtype=np.int64)


def read_ratings(name: str, data_dir: str | Path | None = None) -> Ratings:
    """Load one MovieLens-format data set; ratings are kept only as implicit feedback."""
    folder = locate(name, data_dir)
    path = folder / RATINGS_FILE[name]
    if name in ("ml-100k", "synthetic"):
        rows = _parse_rows(path, "\t", skip_header=False, encoding="latin-1")
    elif name == "ml-1m":
        rows = _parse_rows(path, "::", skip_header=False, encoding="latin-1")
    else:
        rows = _parse_rows(path, ",", skip_header=True, encoding="utf-8")
    return Ratings(rows[:, 0], rows[:, 1], rows[:, 2], path, file_checksum(path), read_items(name, folder))
