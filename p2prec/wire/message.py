"""The message schema and its encoder: a msgpack header frame plus raw tensor frames.

Why this shape: a large tensor travels as its own ZeroMQ frame straight from the
array's buffer, so a megabyte adapter is never copied into a serialisation buffer, and
the receiver views every tensor with ``np.frombuffer`` without copying either. The
header is plain msgpack data (no pickle, nothing that runs code) and describes every
tensor, so a receiver can check sizes before it looks at a single payload byte.

Header (frame 0), a msgpack map with exactly these keys::

    {"v": PROTOCOL_VERSION, "type": int (MessageType), "sender": int, "round": int,
     "codec": str, "meta": {str: int | float | str},
     "tensors": [[name: str, dtype: str, shape: [int, ...], nbytes: int], ...]}

The payload frames that follow hold the tensors' bytes, little-endian, C order: small
tensors share packed frames, large ones get a frame each (see
:mod:`p2prec.wire.layout`, which derives the layout from the declared ``nbytes``).
Decoding lives in :mod:`p2prec.wire.validate`, because there is deliberately no way to
turn received bytes into a :class:`Message` without validating them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack
import numpy as np

from p2prec.wire.layout import PACK_ALIGN, frame_layout, padded

PROTOCOL_VERSION = 1

Scalar = int | float | str
"""The value type of ``Message.meta``: small scalars only, never nested data."""

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    # numpy has no bfloat16: its bit patterns travel, and are held, as uint16.
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
"""Wire dtype tag -> the numpy dtype a tensor with that tag is held in.

The integer types exist for codec payloads (quantised values, top-k indices). A uint16
array is always read as bfloat16 bits, because no other tag uses uint16.
"""

_TAG_OF_DTYPE: dict[np.dtype, str] = {dtype: tag for tag, dtype in WIRE_DTYPES.items()}
_ZEROS = bytes(PACK_ALIGN)
"""Padding after a packed tensor whose size is not a multiple of PACK_ALIGN."""


class MessageType(enum.IntEnum):
    """What a message is for; it travels as its integer value."""

    GOSSIP = 1
    """A node's shared adapter, for its neighbours to mix."""
    AGGREGATE_UP = 2
    """A client's shared adapter for its edge aggregator; ``meta["samples"]`` weights it."""
    AGGREGATE_DOWN = 3
    """An aggregator's mixed adapter, sent back to its member clients."""
    HELLO = 4
    """A node announcing itself; carries no tensors."""
    BYE = 5
    """A node leaving cleanly; carries no tensors."""
    JOIN_REQUEST = 6
    """A node joining a running network asks a neighbour for its shared state; carries no tensors."""
    JOIN_STATE = 7
    """The answer: the sender's shared state after round ``round``, with a gossip message's tensors."""


TENSORLESS_TYPES = frozenset({MessageType.HELLO, MessageType.BYE, MessageType.JOIN_REQUEST})
"""Control messages, which must carry no tensors; every other type carries a full set."""


@dataclass(frozen=True, slots=True)
class Message:
    """One wire message.

    ``tensors`` maps codec payload names to arrays. Arrays from
    :func:`p2prec.wire.validate_and_decode` are read-only views of the received frames:
    the receiver copies them once, into its own buffer, when it aggregates.
    """

    type: MessageType
    sender: int
    round: int
    codec: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Scalar] = field(default_factory=dict)
    wire_bytes: int = field(default=0, compare=False)
    """Bytes of the frames it arrived in (0 for a message not received): what a receiver
    counts as received traffic, the same count a sender makes of what it queued."""


MAX_EXCHANGES = 16
"""Most exchanges a round may have (``gossip.exchanges``); bounds what a receiver holds."""
EXCHANGE = "exchange"
"""Meta key of a message's exchange within its round, present only after the first exchange.

Why only then: a network with one exchange per round (``gossip.exchanges = 1``, the
default) sends exactly the messages it always has; a receiver reads a missing key as 0.
"""


def exchange_meta(exchange: int) -> dict[str, Scalar]:
    """The meta entry naming ``exchange``: none for exchange 0 (see :data:`EXCHANGE`)."""
    return {EXCHANGE: exchange} if exchange else {}


def exchange_of(msg: Message) -> int:
    """Which exchange of its round ``msg`` belongs to (0 when its meta names none); the
    validator has checked that a named one is an int in ``1 .. MAX_EXCHANGES - 1``."""
    return int(msg.meta.get(EXCHANGE, 0))


def wire_dtype_tag(dtype: np.dtype) -> str:
    """Return the wire tag of a numpy dtype, refusing dtypes the protocol cannot carry."""
    tag = _TAG_OF_DTYPE.get(np.dtype(dtype))
    if tag is None:
        raise TypeError(f"dtype {dtype} cannot go on the wire; allowed: {sorted(WIRE_DTYPES)}")
    return tag


def encode(msg: Message) -> list[bytes | memoryview]:
    """Encode ``msg`` as ZeroMQ frames: the header, then the payload frames.

    A large C-contiguous array is sent from its own memory (no copy); small ones are
    joined into packed frames, and any other array is made contiguous once. With
    ``send_multipart(..., copy=False)`` ZeroMQ may still read the arrays after this
    returns, so the caller must not modify them in place until the message has left
    (send codec output or a snapshot, not live parameters).
    """
    arrays = [np.asarray(arr, order="C") for arr in msg.tensors.values()]
    sizes = tuple(arr.nbytes for arr in arrays)
    header = {
        "v": PROTOCOL_VERSION,
        "type": int(msg.type),
        "sender": msg.sender,
        "round": msg.round,
        "codec": msg.codec,
        "meta": msg.meta,
        "tensors": [
            [name, wire_dtype_tag(arr.dtype), list(arr.shape), nbytes]
            for name, arr, nbytes in zip(msg.tensors, arrays, sizes)
        ],
    }
    layout = frame_layout(sizes)
    members: list[list[np.ndarray]] = [[] for _ in layout.frame_bytes]
    for arr, (frame, _) in zip(arrays, layout.slots):
        members[frame].append(arr)
    payload = [_payload_frame(group, packed) for group, packed in zip(members, layout.packed)]
    return [msgpack.packb(header), *payload]


def _payload_frame(arrays: list[np.ndarray], packed: bool) -> bytes | memoryview:
    """One payload frame: a large tensor's own memory, or packed tensors each zero-padded
    to PACK_ALIGN.

    A packed frame is one ``bytes.join`` over the arrays' buffers: measured here, a
    quarter of the cost of assigning each tensor into a zeroed buffer. A packed frame
    holding one tensor that needs no padding is that tensor's memory, not a copy.
    """
    if not packed or (len(arrays) == 1 and arrays[0].nbytes % PACK_ALIGN == 0):
        return memoryview(arrays[0].reshape(-1).view(np.uint8))
    parts: list[np.ndarray | bytes] = []
    for arr in arrays:
        parts.append(arr)
        if arr.nbytes % PACK_ALIGN:
            parts.append(_ZEROS[: padded(arr.nbytes) - arr.nbytes])
    return b"".join(parts)
