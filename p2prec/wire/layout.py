"""Where each tensor's bytes sit among a message's payload frames.

Why not simply one frame per tensor: ZeroMQ and pyzmq cost several microseconds per
frame whatever its size, which dominates an adapter made of many small tensors, while
copying a small tensor costs far less. So small tensors share packed frames and each
large tensor travels in its own frame, zero-copy.

Packed frames stay under :data:`PACK_BELOW` bytes because pyzmq copies frames that
small even with ``copy=False``; measured here, one zero-copy frame of a few hundred KB
in front of a large one made the whole message up to 70% slower, while several copied
frames under 64 KiB cost little.

The layout is a pure function of the declared byte counts, in header order: the header
needs no layout field, and sender and receiver cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

PACK_BELOW = 65536
"""Packed frames stay shorter than this (pyzmq's default copy threshold)."""
PACK_ALIGN = 8
"""Each packed tensor starts at a multiple of this offset, so its view is aligned."""


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """``slots[i]`` is (payload frame index, byte offset) of tensor i;
    ``frame_bytes[j]`` is payload frame j's length and ``packed[j]`` whether it is a
    packed frame (zero-padded tensors) rather than one large tensor's own bytes.

    Tuples, because :func:`frame_layout` hands the same cached instance to every caller."""

    slots: tuple[tuple[int, int], ...]
    frame_bytes: tuple[int, ...]
    packed: tuple[bool, ...]


def padded(nbytes: int) -> int:
    """Bytes a tensor takes in a packed frame: its size rounded up to PACK_ALIGN."""
    return -(-nbytes // PACK_ALIGN) * PACK_ALIGN


@lru_cache(maxsize=256)
def frame_layout(sizes: tuple[int, ...]) -> FrameLayout:
    """Lay out tensors of the given byte counts, in header order.

    A tensor whose padded size is under PACK_BELOW joins the most recently opened packed
    frame if it still fits under PACK_BELOW, else opens a new one; a larger tensor gets
    a frame of its own.

    Cached because a node sends and receives the same adapter shapes every round, and
    the layout loop costs as much as the rest of encoding a small adapter. The cache is
    bounded, so a peer varying its sizes (where the spec allows) only evicts entries.
    """
    slots: list[tuple[int, int]] = []
    frame_bytes: list[int] = []
    packed: list[bool] = []
    filling = -1  # the packed frame small tensors currently go to; -1 before the first
    for nbytes in sizes:
        size = padded(nbytes)
        if size >= PACK_BELOW:
            slots.append((len(frame_bytes), 0))
            frame_bytes.append(nbytes)
            packed.append(False)
            continue
        if filling < 0 or frame_bytes[filling] + size >= PACK_BELOW:
            filling = len(frame_bytes)
            frame_bytes.append(0)
            packed.append(True)
        slots.append((filling, frame_bytes[filling]))
        frame_bytes[filling] += size
    return FrameLayout(tuple(slots), tuple(frame_bytes), tuple(packed))
