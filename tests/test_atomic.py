"""The one atomic write survives its writer being killed before its rename.

Killing writers at random instants, many times, is
``tests/test_node.py::test_a_writer_killed_mid_write_leaves_a_whole_checkpoint`` (checkpoints
go through :func:`p2prec.atomic.write_bytes_atomic`). Here the kill lands, for certain, in
the widest window: all bytes written, nothing renamed yet. What the killed writer leaves
behind is its own hidden ``.NAME.*.tmp`` file, which :mod:`p2prec.atomic` leaves in place.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from p2prec.atomic import write_bytes_atomic

SIZE = 8 << 20
OLD, NEW = b"o" * SIZE, b"n" * SIZE

# A writer that stops dead after its data is written and synced but before the rename: the
# widest window a crash can hit, made certain instead of left to timing.
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


def test_a_writer_killed_before_its_rename_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_bytes_atomic(target, OLD)
    proc = subprocess.Popen([sys.executable, "-c", STALL, str(target), str(SIZE)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"written\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert target.read_bytes() == OLD
    strays = [p for p in tmp_path.iterdir() if p != target]
    assert len(strays) == 1 and strays[0].name.startswith(".state.bin.") and strays[0].name.endswith(".tmp")
    assert stat.S_IMODE(strays[0].stat().st_mode) == 0o600, "a stray must not expose what it holds"
    write_bytes_atomic(target, NEW)  # the stray does not stand in the next writer's way
    assert target.read_bytes() == NEW
