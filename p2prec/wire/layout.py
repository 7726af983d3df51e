"""Where each tensor's bytes sit among a message's payload frames.

Why not simply one frame per tensor: ZeroMQ and pyzmq cost about 10 microseconds per
frame whatever its size, which dominates a small adapter made of many small tensors,
while copying a small tensor costs far less (and pyzmq copies frames under 64 KiB even
when asked not to). So tensors under :data:`PACK_BELOW` bytes share one packed frame and
each larger tensor travels in its own frame, zero-copy. The layout is a pure function
of the declared byte counts: the header needs no layout field, and sender and receiver
cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PACK_BELOW = 65536
"""Tensors with fewer bytes than this go into the packed frame."""
PACK_ALIGN = 8
"""Each packed tensor starts at a multiple of this offset, so its view is aligned."""


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """``slots[i]`` is (payload frame index, byte offset) of tensor i; ``frame_bytes[j]``
    is payload frame j's length. When ``packed``, payload frame 0 is the packed frame;
    the large tensors' frames follow in header order."""

    slots: list[tuple[int, int]]
    frame_bytes: list[int]
    packed: bool


def frame_layout(sizes: Sequence[int]) -> FrameLayout:
    """Lay out tensors of the given byte counts, in header order."""
    small = [nbytes < PACK_BELOW for nbytes in sizes]
    frame_bytes = [0] if any(small) else []
    slots: list[tuple[int, int]] = []
    for nbytes, is_small in zip(sizes, small):
        if is_small:
            slots.append((0, frame_bytes[0]))
            frame_bytes[0] += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
        else:
            slots.append((len(frame_bytes), 0))
            frame_bytes.append(nbytes)
    return FrameLayout(slots, frame_bytes, packed=any(small))
