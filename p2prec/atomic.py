"""The package's one atomic, durable file write.

Why one: checkpoints, keys, run results, cached embeddings and backbones all promise that a
crash at any instant leaves either the previous complete file or the new one, never a
torn one. The bytes go to a temporary file in the same folder, which is flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX), and the folder
is fsynced so the rename itself survives a power cut.

The temporary file is created with mode 0600 before a byte is written and gets ``mode``
only just before the rename, so a secret key is never readable by others, even briefly.

A writer killed outright (SIGKILL, power loss) before its rename leaves the previous file
untouched and a stray ``.NAME.<random>.tmp`` beside it, which nothing reads. It is left
there on purpose: sweeping strays on the next write could delete the temporary file of
another writer of the same target still in progress, and make its rename fail; a stray
is safe to delete by hand whenever no writer runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; the file gets permissions ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so renames and new entries inside it are durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
