"""Item metadata readers: one title and one text per item, for every MovieLens format.

Why text: a text-grounded backbone represents an item by what a pre-trained language model
makes of its title, year and genres, so it can score items it never saw in training and
items of another catalogue. Each format is read strictly, and a malformed line is reported
as ``path:line: problem``, as the ratings readers do, because a silently skipped line would
give an item the wrong text.

The text of an item is ``"<title>. <genre>, <genre>."``, for example
``"Toy Story (1995). Animation, Children's, Comedy."``. MovieLens titles already carry the
year; where ML-100K's title lacks it, the release date's year is appended.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from p2prec.data.errors import DataError

#: ML-100K's 19 genre flags, in ``u.genre`` order (the file is not needed to read ``u.item``).
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")

#: The metadata file of each on-disk format.
ITEMS_FILE: dict[str, str] = {
    "ml-100k": "u.item",
    "synthetic": "u.item",
    "ml-1m": "movies.dat",
    "ml-latest": "movies.csv",
}

_YEAR = re.compile(r"\((\d{4})\)\s*$")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class ItemMeta:
    """One item's title and genres, as the data set spells them."""

    title: str
    genres: tuple[str, ...]

    @property
    def text(self) -> str:
        """The item's text for the encoder: title, then its genres."""
        genres = [g for g in self.genres if g not in ("unknown", "(no genres listed)")]
        return f"{self.title}. {', '.join(genres)}." if genres else f"{self.title}."


def title_key(title: str) -> str:
    """A title lower-cased with punctuation dropped: the key that matches items across catalogues."""
    return " ".join(_NOT_WORD.sub(" ", title.lower()).split())


def read_items(name: str, folder: Path) -> dict[int, ItemMeta]:
    """Every item's metadata in ``folder`` for data set ``name``; ``{}`` if the file is absent."""
    path = folder / ITEMS_FILE[name]
    if not path.is_file():
        return {}
    if name in ("ml-100k", "synthetic"):
        return _read_100k(path)
    if name == "ml-1m":
        return _read_1m(path)
    return _read_latest(path)


def _item_id(path: Path, lineno: int, text: str) -> int:
    if not text.strip().isdigit():
        raise DataError(f"{path}:{lineno}: item id {text[:20]!r} is not a non-negative integer")
    return int(text)


def _read_100k(path: Path) -> dict[int, ItemMeta]:
    """``u.item``: ``id|title|release date|video release date|IMDb URL|`` then 19 0/1 genre flags."""
    items: dict[int, ItemMeta] = {}
    for lineno, line in _lines(path):
        parts = line.split("|")
        if len(parts) != 5 + len(GENRES_100K):
            raise DataError(f"{path}:{lineno}: expected {5 + len(GENRES_100K)} fields separated by '|', "
                            f"got {len(parts)}")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{path}:{lineno}: genre flags must be 0 or 1")
        title = parts[1].strip()
        year = parts[2].strip()[-4:]
        if title and not _YEAR.search(title) and year.isdigit():
            title = f"{title} ({year})"
        items[_item_id(path, lineno, parts[0])] = ItemMeta(
            title, tuple(g for g, f in zip(GENRES_100K, flags) if f == "1"))
    return items


def _read_1m(path: Path) -> dict[int, ItemMeta]:
    """``movies.dat``: ``id::title (year)::Genre|Genre``, latin-1."""
    items: dict[int, ItemMeta] = {}
    for lineno, line in _lines(path):
        parts = line.split("::")
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 fields separated by '::', got {len(parts)}")
        items[_item_id(path, lineno, parts[0])] = ItemMeta(parts[1].strip(), tuple(parts[2].split("|")))
    return items


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a latin-1 file, without their line ends, with 1-based line numbers."""
    with path.open("r", encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line.rstrip("\r\n")


def _read_latest(path: Path) -> dict[int, ItemMeta]:
    """``movies.csv``: a header, then ``movieId,title,genres`` (quoted where the title has commas)."""
    items: dict[int, ItemMeta] = {}
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if lineno == 1 or not row:
                    continue
                if len(row) != 3:
                    raise DataError(f"{path}:{lineno}: expected 3 comma-separated fields, got {len(row)}")
                items[_item_id(path, lineno, row[0])] = ItemMeta(row[1].strip(), tuple(row[2].split("|")))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not utf-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    return items
