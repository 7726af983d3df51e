"""Keep freed memory in the process rather than handing it back to the kernel (glibc only).

Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. The simulator allocates and frees
temporaries of hundreds of MB every round (754 nodes' stacked adapters, gradients, Adam
moments, evaluation scores), so the kernel zero-fills every page of each of them again on
first touch: one default ML-100K run took 249 million minor page faults
(``/usr/bin/time -v``). Serving large blocks from the heap and never trimming it lets a
freed block be reused as it is: a round became 1.42x and an evaluation 1.50x faster at 754
nodes on one thread (``benchmarks/bench_allocator.py`` measures both side by side).
The arithmetic is untouched, so results are bit for bit the same.

The cost is that the resident size stays at its peak instead of shrinking between rounds,
which a process that runs rounds until it ends would reach again anyway. Set
``P2PREC_KEEP_FREED_MEMORY=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
"""glibc's ``mallopt`` parameter: free heap top above this many bytes is returned to the kernel."""
M_MMAP_MAX = -4
"""glibc's ``mallopt`` parameter: how many blocks may be served by ``mmap`` (0: none)."""
ENV = "P2PREC_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and never trim it; True if it took effect.

    A no-op (False) without glibc (macOS, musl) or when ``P2PREC_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
