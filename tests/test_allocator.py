"""Keeping freed memory: large blocks are reused instead of being zero-filled again by the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from p2prec.allocator import ENV, keep_freed_memory

# Allocate and free a 64 MB tensor 30 times, touching every page, and print the minor page
# faults of the last 10. The first few allocations grow the heap (glibc reuses a freed block
# once its neighbours have coalesced into one large enough: measured, 6-8 allocations here),
# which a simulator reaches within its first round.
CHURN = """
import resource, torch
from p2prec.allocator import keep_freed_memory
keep_freed_memory()
for _ in range(20):
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep: bool) -> int:
    env = {**os.environ, ENV: "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def glibc() -> bool:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not glibc(), reason="mallopt is glibc's")
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    pages = 16 * 2**20 * 4 // os.sysconf("SC_PAGE_SIZE")
    default, kept = faults(False), faults(True)
    assert default >= 10 * pages  # every allocation faults its pages in again
    assert kept < pages  # a freed block is reused as it is


def test_the_environment_switch_keeps_the_libc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False
