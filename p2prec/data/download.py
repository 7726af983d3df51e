"""Download MovieLens data sets from GroupLens on a machine with internet, verifying checksums.

Never called by tests or at run time: the loaders only read local files. The archive is
fetched to a temporary file, ``u.data`` is checked against its published MD5, and only
then is the folder moved into place, so a failed download leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from p2prec.data.movielens import DataError, file_checksum

SOURCES = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "u.data", "6e47046882bad158b0efbb84cd5cb987"),
    # The 2018 snapshot of the small "latest" set: the public corpus that backbones pre-train on.
    "ml-latest-small": ("https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
                        "ratings.csv", "3368dd46cc2af83119cef132d9c7b54a"),
}


def download(name: str, dest: Path, timeout_s: float = 60.0) -> Path:
    """Fetch ``name`` into ``dest/name`` and verify it; return the folder."""
    if name not in SOURCES:
        raise DataError(f"no download source for {name!r} (available: {', '.join(SOURCES)}); "
                        f"place the files in a folder and pass --data-dir")
    url, check_file, md5 = SOURCES[name]
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))
    try:
        archive = work / "archive.zip"
        with urllib.request.urlopen(url, timeout=timeout_s) as response, archive.open("wb") as fh:
            shutil.copyfileobj(response, fh)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(work)
        folder = work / name
        got = file_checksum(folder / check_file)
        if got != md5:
            raise DataError(f"{url}: checksum of {check_file} is {got}, expected {md5}; not installed")
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
        return target
    except OSError as exc:
        raise DataError(f"could not download {url}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
