"""The one atomic write survives its writer being killed at any instant.

A child process writes through :func:`p2prec.atomic.write_bytes_atomic` and is SIGKILLed
while it does; the target must then hold one whole version, never a mixture, and what the
killed writer leaves behind is at most its own hidden ``.NAME.*.tmp`` file.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2prec.atomic import write_bytes_atomic

SIZE = 8 << 20
"""Large enough that a write takes many system calls, small enough for a 2-core test machine."""

OLD, NEW = b"o" * SIZE, b"n" * SIZE

# A writer that alternates two full versions of the target until it is killed.
LOOP = """
import sys
from p2prec.atomic import write_bytes_atomic
target, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while True:
    for byte in (b"n", b"o"):
        write_bytes_atomic(target, byte * size)
"""

# A writer that stops dead after its data is written but before the rename: the widest
# window a crash can hit, made certain instead of left to timing.
STALL = """
import os, sys, time
from p2prec.atomic import write_bytes_atomic
real_fsync = os.fsync
def stall(fd):
    real_fsync(fd)
    print("written", flush=True)
    time.sleep(3600)
os.fsync = stall
write_bytes_atomic(sys.argv[1], b"n" * int(sys.argv[2]))
"""


def _writer(script: str, target: Path) -> subprocess.Popen:
    """Start ``script`` writing to ``target`` and wait until it says it is under way."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(SIZE)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the writer died before it started"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _strays(target: Path) -> list[Path]:
    return [p for p in target.parent.iterdir() if p != target]


def test_a_writer_killed_before_its_rename_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_bytes_atomic(target, OLD)
    _kill(_writer(STALL, target))
    assert target.read_bytes() == OLD
    strays = _strays(target)
    assert len(strays) == 1 and strays[0].name.startswith(".state.bin.") and strays[0].name.endswith(".tmp")
    assert stat.S_IMODE(strays[0].stat().st_mode) == 0o600, "a stray must not expose what it holds"
    write_bytes_atomic(target, NEW)  # the stray does not stand in the next writer's way
    assert target.read_bytes() == NEW


@pytest.mark.parametrize("trial", range(4))
def test_a_writer_killed_at_a_random_instant_never_leaves_a_torn_file(tmp_path: Path, trial: int) -> None:
    target = tmp_path / "state.bin"
    write_bytes_atomic(target, OLD)
    proc = _writer(LOOP, target)
    time.sleep(random.Random(trial).uniform(0.05, 0.6))
    _kill(proc)
    assert target.read_bytes() in (OLD, NEW)
    assert len(_strays(target)) <= 1
