"""Turn received frames into a :class:`Message`, treating every byte as hostile.

Invariants a returned message satisfies (the node relies on them and checks nothing
again): the header is exactly the schema of :mod:`p2prec.wire.message`, every field is
in bounds, the tensors are exactly the receiver's expected names with the expected
shapes, the payload is no larger than the receiver allows, and every float is finite.

Order matters: the header frame is size-checked before msgpack sees it and unpacked
with per-object limits, and the declared tensor sizes are checked against the budget
before any payload frame is touched, so a hostile peer cannot make the receiver
allocate or scan more than the spec allows. Arrays are zero-copy, read-only views of
the frames; the receiver copies them once, into its own buffer, when it aggregates.

A peer sends the same tensor table (names, dtypes, shapes, order) every round, and
checking it costs more than the rest of the header, so the header is unpacked with the
table left as its msgpack bytes: a table is unpacked and checked the first time its
bytes are seen and recognised by those exact bytes afterwards. Equal bytes unpack to
the same table, so a remembered table is one that passed every check for this spec
(tables are remembered per :class:`WireSpec`: a receiver keeps its spec). Everything
else, payload included, is checked on every message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack
import numpy as np
import zmq

from p2prec.wire.finite import Run, first_non_finite, float_runs
from p2prec.wire.layout import FrameLayout, frame_layout
from p2prec.wire.message import (
    EXCHANGE,
    MAX_EXCHANGES,
    PROTOCOL_VERSION,
    TENSORLESS_TYPES,
    WIRE_DTYPES,
    Message,
    MessageType,
    Scalar,
)

MAX_STR = 64
"""Longest codec name, meta key or meta string, in characters."""
MAX_META = 8
"""Most entries in ``meta``: it carries a few scalars such as ``samples``, not data."""
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_SENDER = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

HEADER_KEYS = frozenset({"v", "type", "sender", "round", "codec", "meta", "tensors"})
_MAX_MAP = max(len(HEADER_KEYS), MAX_META)
"""msgpack's map limit, for the header map and the meta map inside it."""
_TYPES = {int(t): t for t in MessageType}
"""Message types by value: a dict lookup costs a tenth of calling ``MessageType``."""
_HEADER_BASE_BYTES = 4096
"""Header budget for everything but the tensor table: the envelope plus a full meta map."""
_TENSOR_ENTRY_BYTES = 64
"""Header budget per tensor entry, besides its name: dtype tag, 8-dim shape, nbytes."""
_TABLES_PER_SPEC = 16
"""Checked tensor tables a spec remembers. Each peer sends one table over and over, so
a few suffice; a peer that sends ever-new valid tables only makes the receiver forget
and check again, with the cost bounded as for any message."""
Frame = zmq.Frame | bytes | bytearray | memoryview


class WireError(ValueError):
    """A received message broke the protocol; the message says which rule, in one line."""


@dataclass(frozen=True)
class WireSpec:
    """What a receiver accepts.

    ``tensors`` maps each expected tensor name to its shape; each tensor's declared shape
    must equal it, and its declared byte count must match that shape. Every codec's payload
    has fixed shapes (top-k keeps ``ceil(fraction * D)`` entries), so there is no unchecked mode.
    ``max_bytes`` caps the sum of the tensors' bytes. ``known_senders=None`` accepts
    any sender id (the transport's key allow-list is then the only gate).
    """

    tensors: Mapping[str, tuple[int, ...]]
    max_bytes: int
    allowed_dtypes: frozenset[str] = frozenset(WIRE_DTYPES)
    known_senders: frozenset[int] | None = None
    max_round: int = 2**31

    def __post_init__(self) -> None:
        unknown = self.allowed_dtypes - WIRE_DTYPES.keys()
        if unknown:
            raise ValueError(f"WireSpec.allowed_dtypes has dtypes the wire cannot carry: {sorted(unknown)}")
        if self.max_bytes <= 0 or self.max_round < 0:
            raise ValueError("WireSpec.max_bytes must be positive and max_round non-negative")
        shapes = {name: tuple(int(d) for d in shape) for name, shape in self.tensors.items()}
        for name, shape in shapes.items():
            if len(shape) > MAX_NDIM or any(not 0 <= d <= MAX_DIM for d in shape):
                raise ValueError(f"WireSpec shape for {name!r} is out of bounds: {shape}")
        object.__setattr__(self, "tensors", shapes)  # tuples of ints, to compare with headers

    @cached_property
    def max_header_bytes(self) -> int:
        """The largest header frame a valid message for this spec can have."""
        names = sum(len(name.encode()) for name in self.tensors)
        return _HEADER_BASE_BYTES + names + _TENSOR_ENTRY_BYTES * len(self.tensors)

    @cached_property
    def max_str_bytes(self) -> int:
        """msgpack's string limit: long enough for the longest expected tensor name."""
        return max([MAX_STR, *(len(name.encode()) for name in self.tensors)])

    @cached_property
    def unpack_limits(self) -> dict[str, Any]:
        """msgpack options for every part of the header: text strings only, and per-object
        limits that keep a small header from expanding into many large objects."""
        return {
            "raw": False,
            "strict_map_key": True,
            "max_str_len": self.max_str_bytes,
            "max_bin_len": 0,
            "max_ext_len": 0,
            "max_array_len": max(len(self.tensors), MAX_NDIM, 4),
            "max_map_len": _MAX_MAP,
        }

    @cached_property
    def checked_tables(self) -> dict[bytes, CheckedTable]:
        """Tensor tables, by their msgpack bytes, that passed every check for this spec."""
        return {}


@dataclass(frozen=True, slots=True)
class CheckedTable:
    """A tensor table that passed every check, and what decoding derives from it."""

    entries: tuple[_Entry, ...]
    complete: bool
    """Whether it names every tensor of the spec (each at most once, as checked)."""
    layout: FrameLayout
    float_runs: tuple[Run, ...]
    views: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]
    """Per tensor: name, numpy dtype, shape, payload frame index, byte offset."""


def validate_and_decode(frames: Sequence[Frame], spec: WireSpec) -> Message:
    """Check ``frames`` against ``spec`` and return the message; raise :class:`WireError` otherwise.

    This is the only way received bytes become a :class:`Message`.
    """
    if not frames:
        raise WireError("empty message: no header frame")
    header = _unpack_header(_byte_view(frames[0]), spec)
    msg_type = _message_type(header["type"])
    sender = _bounded_int(header["sender"], "sender", 0, MAX_SENDER)
    if spec.known_senders is not None and sender not in spec.known_senders:
        raise WireError(f"unknown sender {sender}")
    round_ = _bounded_int(header["round"], "round", 0, spec.max_round)
    codec = _short_str(header["codec"], "codec")
    meta = _meta(header["meta"], msg_type)
    table = _tensor_table(header["tensors"], spec)
    if msg_type in TENSORLESS_TYPES:
        if table.entries:
            raise WireError(f"{msg_type.name} must carry no tensors, got {len(table.entries)}")
    elif not table.complete:
        missing = spec.tensors.keys() - {entry[0] for entry in table.entries}
        raise WireError(f"{msg_type.name} is missing tensors {_show(sorted(missing))}")
    frame_bytes = table.layout.frame_bytes
    if len(frames) != 1 + len(frame_bytes):
        raise WireError(f"frame count {len(frames)} != 1 header + {len(frame_bytes)} payload frames")
    payload = [_byte_view(frame) for frame in frames[1:]]
    for index, (view, nbytes) in enumerate(zip(payload, frame_bytes)):
        if view.nbytes != nbytes:
            raise WireError(f"payload frame {index} has {view.nbytes} bytes, header implies {nbytes}")
    bad = first_non_finite(payload, table.float_runs)
    if bad is not None:
        tag, frame, start, end = bad
        raise WireError(f"payload frame {frame} bytes {start}..{end}: non-finite {tag} (NaN or Inf)")
    tensors = {
        name: np.ndarray(shape, dtype, payload[frame], offset) for name, dtype, shape, frame, offset in table.views
    }
    return Message(type=msg_type, sender=sender, round=round_, codec=codec, tensors=tensors, meta=meta,
                   wire_bytes=sum(view.nbytes for view in payload) + _byte_view(frames[0]).nbytes)


_Entry = tuple[str, str, tuple[int, ...], int]
"""A checked tensor table entry: name, dtype tag, shape, nbytes."""


def _byte_view(frame: Frame) -> memoryview:
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _show(value: Any) -> str:
    """A short repr of a hostile value, so an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unpack_header(raw: memoryview, spec: WireSpec) -> dict[str, Any]:
    """Unpack frame 0 under size limits, the tensor table left as its msgpack bytes; check
    the version first (a newer protocol may have other keys), then the exact key set.

    The length check stands in for an Unpacker's ``max_buffer_size``. Keys must be
    strings (bytes pass msgpack's ``strict_map_key`` but fail the key check) and
    distinct, and nothing may follow the map.
    """
    if raw.nbytes > spec.max_header_bytes:
        raise WireError(f"header frame is {raw.nbytes} bytes, limit {spec.max_header_bytes}")
    if raw.nbytes and not _is_map(raw[0]):
        raise WireError(f"header is not a map (msgpack type byte {raw[0]:#04x})")
    unpacker = msgpack.Unpacker(max_buffer_size=max(raw.nbytes, 1), **spec.unpack_limits)
    unpacker.feed(raw)
    header: dict[Any, Any] = {}
    try:
        size = unpacker.read_map_header()
        if size > _MAX_MAP:
            raise ValueError(f"{size} exceeds max_map_len({_MAX_MAP})")
        for _ in range(size):
            key = unpacker.unpack()
            if type(key) is not str and type(key) is not bytes:
                raise ValueError(f"{type(key).__name__} is not allowed for map key")
            if key in header:
                raise ValueError(f"duplicate map key {key!r}")
            if key == "tensors":
                start = unpacker.tell()
                unpacker.skip()  # no limits apply here; _tensor_table applies them
                header[key] = bytes(raw[start : unpacker.tell()])
            else:
                header[key] = unpacker.unpack()
        if unpacker.tell() != raw.nbytes:
            raise ValueError(f"{raw.nbytes - unpacker.tell()} bytes after the header map")
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"header is not valid bounded msgpack: {_show(str(exc))}") from None
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {_show(version)}, expected {PROTOCOL_VERSION}")
    if header.keys() != HEADER_KEYS:
        extra = sorted(map(str, header.keys() - HEADER_KEYS))
        missing = sorted(HEADER_KEYS - header.keys())
        raise WireError(f"header keys wrong: extra {_show(extra)}, missing {missing}")
    return header


def _is_map(first_byte: int) -> bool:
    """Whether a msgpack object starting with this byte is a map (fixmap, map 16, map 32)."""
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def _bounded_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise WireError(f"{what} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _short_str(value: Any, what: str) -> str:
    if type(value) is not str or len(value) > MAX_STR:
        raise WireError(f"{what} must be a string of at most {MAX_STR} chars, got {_show(value)}")
    return value


def _message_type(value: Any) -> MessageType:
    msg_type = _TYPES.get(value) if type(value) is int else None
    if msg_type is None:
        raise WireError(f"unknown message type {_show(value)}")
    return msg_type


def _meta(meta: Any, msg_type: MessageType) -> dict[str, Scalar]:
    """Check the small scalar map; an AGGREGATE_UP must say how many samples it weighs, and
    an exchange index, where present, is a small positive int (exchange 0 names none).

    Its size is already bounded: the header was unpacked with ``max_map_len=MAX_META``.
    """
    if type(meta) is not dict:
        raise WireError(f"meta must be a map, got {_show(meta)}")
    for key, value in meta.items():
        _short_str(key, "meta key")
        if type(value) is int:
            _bounded_int(value, f"meta {key!r}", INT64_MIN, INT64_MAX)
        elif type(value) is float:
            if not math.isfinite(value):
                raise WireError(f"meta {key!r} is not finite: {value}")
        else:
            _short_str(value, f"meta {key!r}")
    if msg_type is MessageType.AGGREGATE_UP:
        _bounded_int(meta.get("samples"), "meta 'samples' of AGGREGATE_UP", 1, INT64_MAX)
    if EXCHANGE in meta:
        _bounded_int(meta[EXCHANGE], f"meta {EXCHANGE!r}", 1, MAX_EXCHANGES - 1)
    return meta


def _tensor_table(table_bytes: bytes, spec: WireSpec) -> CheckedTable:
    """The checked table these bytes encode: remembered, or unpacked and checked now.

    Every declared tensor and the total size are checked before any payload frame is
    read; whether the message type needs a complete table is the caller's check.
    """
    known = spec.checked_tables.get(table_bytes)
    if known is not None:
        return known
    try:
        table = msgpack.unpackb(table_bytes, **spec.unpack_limits)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"header is not valid bounded msgpack: {_show(str(exc))}") from None
    if type(table) is not list:
        raise WireError(f"tensors must be a list, got {_show(table)}")
    entries: list[_Entry] = []
    names: set[str] = set()
    total = 0
    for item in table:
        entry = _tensor_entry(item, spec)
        if entry[0] in names:
            raise WireError(f"duplicate tensor name {entry[0]!r}")
        names.add(entry[0])
        total += entry[3]
        if total > spec.max_bytes:
            raise WireError(f"declared tensor bytes exceed the limit of {spec.max_bytes}")
        entries.append(entry)
    layout = frame_layout(tuple(entry[3] for entry in entries))
    placements = [
        (tag, frame, offset, offset + nbytes) for (_, tag, _, nbytes), (frame, offset) in zip(entries, layout.slots)
    ]
    checked = CheckedTable(
        entries=tuple(entries),
        complete=len(names) == len(spec.tensors),
        layout=layout,
        float_runs=tuple(float_runs(placements)),
        views=tuple(
            (name, WIRE_DTYPES[tag], shape, frame, offset)
            for (name, tag, shape, _), (frame, offset) in zip(entries, layout.slots)
        ),
    )
    if len(spec.checked_tables) >= _TABLES_PER_SPEC:
        spec.checked_tables.pop(next(iter(spec.checked_tables)), None)  # forget the oldest
    spec.checked_tables[table_bytes] = checked
    return checked


def _tensor_entry(item: Any, spec: WireSpec) -> _Entry:
    if type(item) is not list or len(item) != 4:
        raise WireError(f"tensor entry must be [name, dtype, shape, nbytes], got {_show(item)}")
    name, tag, shape, nbytes = item
    if type(name) is not str or name not in spec.tensors:
        raise WireError(f"unexpected tensor name {_show(name)}")
    if type(tag) is not str or tag not in spec.allowed_dtypes:
        raise WireError(f"tensor {name!r}: dtype {_show(tag)} not allowed")
    if (
        type(shape) is not list
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    ):
        bounds = f"up to {MAX_NDIM} ints in [0, {MAX_DIM}]"
        raise WireError(f"tensor {name!r}: shape must be {bounds}, got {_show(shape)}")
    dims = tuple(shape)
    if dims != spec.tensors[name]:
        raise WireError(f"tensor {name!r}: shape {dims} != expected {spec.tensors[name]}")
    expected_bytes = math.prod(dims) * WIRE_DTYPES[tag].itemsize
    if type(nbytes) is not int or nbytes != expected_bytes:
        raise WireError(f"tensor {name!r}: nbytes {_show(nbytes)} != {expected_bytes} from shape and dtype")
    return name, tag, dims, nbytes
