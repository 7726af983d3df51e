"""Wire format: round trips, zero-copy views, every rejection rule, fuzzing, real sockets."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from p2prec.wire import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Message,
    MessageType,
    WireError,
    WireSpec,
    encode,
    validate_and_decode,
    wire_dtype_tag,
)
from p2prec.wire.layout import PACK_ALIGN, PACK_BELOW, frame_layout

ADAPTER_SHAPES = {
    "item_emb.lora_A": (8, 1683),
    "item_emb.lora_B": (64, 8),
    **{f"layer{i}.{p}.lora_A": (8, 64) for i in range(2) for p in ("query", "value")},
    **{f"layer{i}.{p}.lora_B": (64, 8) for i in range(2) for p in ("query", "value")},
    "item_emb.lora_wide": (8, 4096),  # over PACK_BELOW: travels in its own, last, frame
}
BF16_NAN, BF16_INF = 0x7FC0, 0x7F80


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in ADAPTER_SHAPES.items()}


def spec_for(tensors: dict[str, np.ndarray], **overrides: Any) -> WireSpec:
    fields: dict[str, Any] = {
        "tensors": {name: arr.shape for name, arr in tensors.items()},
        "max_bytes": sum(arr.nbytes for arr in tensors.values()),
        "allowed_dtypes": frozenset(wire_dtype_tag(a.dtype) for a in tensors.values()) or frozenset({"float32"}),
        "known_senders": frozenset({1, 2, 3}),
        **overrides,
    }
    return WireSpec(**fields)


def gossip(tensors: dict[str, np.ndarray], **overrides: Any) -> Message:
    fields: dict[str, Any] = {"type": MessageType.GOSSIP, "sender": 2, "round": 7, "codec": "none"}
    return Message(**{**fields, "tensors": tensors, **overrides})


def as_bytes(frames: list[bytes | memoryview]) -> list[bytes]:
    """What a peer receives: the frames' bytes, owning no sender memory."""
    return [bytes(frame) for frame in frames]


def forge(frames: list[bytes], edit: Callable[[dict[str, Any]], object]) -> list[bytes]:
    """Re-pack a valid message's header after ``edit`` changed it in place."""
    header = msgpack.unpackb(frames[0])
    edit(header)
    return [msgpack.packb(header), *frames[1:]]


def assert_same(decoded: Message, sent: Message) -> None:
    assert (decoded.type, decoded.sender, decoded.round, decoded.codec, decoded.meta) == (
        sent.type, sent.sender, sent.round, sent.codec, sent.meta
    )
    assert decoded.tensors.keys() == sent.tensors.keys()
    for name, arr in sent.tensors.items():
        assert decoded.tensors[name].dtype == arr.dtype
        np.testing.assert_array_equal(decoded.tensors[name], arr)


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(WIRE_DTYPES))
def test_round_trip_every_dtype(tag: str) -> None:
    rng = np.random.default_rng(1)
    dtype = WIRE_DTYPES[tag]
    shapes = {"scalar": (), "odd": (3, 5), "empty": (0, 4), "large": (PACK_BELOW // dtype.itemsize + 3,)}
    if dtype.kind == "f":
        tensors = {n: np.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    else:  # integers, and bfloat16 bit patterns of ordinary numbers
        high = 0x3F00 if tag == "bfloat16" else np.iinfo(dtype).max
        tensors = {n: np.asarray(rng.integers(0, high, s, endpoint=True), dtype) for n, s in shapes.items()}
    msg = gossip(tensors, meta={"samples": 12, "lr": 0.01, "note": "ok"})
    frames = encode(msg)
    assert msgpack.unpackb(frames[0])["tensors"][0][1] == tag
    assert_same(validate_and_decode(as_bytes(frames), spec_for(tensors)), msg)


def test_round_trip_realistic_adapter_and_non_contiguous_input() -> None:
    tensors = adapter()
    tensors["layer0.query.lora_B"] = np.asfortranarray(tensors["layer0.query.lora_B"])
    msg = gossip(tensors)
    frames = encode(msg)
    assert len(frames) == 1 + 3  # header, two packed frames under 64 KiB, the wide tensor
    wire_bytes = sum(len(f) for f in frames)
    assert wire_bytes / sum(a.nbytes for a in tensors.values()) < 1.01
    received = validate_and_decode(as_bytes(frames), spec_for(tensors))
    assert_same(received, msg)
    assert received.wire_bytes == wire_bytes and msg.wire_bytes == 0  # what a receiver counts as received traffic


@pytest.mark.parametrize(
    "tensors",
    [
        {"empty": np.zeros((0, 4), np.float32)},
        {"scalar": np.asarray(5, np.int64)},
        {"wide": np.ones(PACK_BELOW, np.uint8), "empty": np.zeros((2, 0), np.int64)},
        {"a": np.ones(PACK_BELOW // 8 - 1, np.int64), "b": np.ones(3, np.int64)},  # one tensor per packed frame
    ],
)
def test_round_trip_frames_holding_a_single_tensor(tensors: dict[str, np.ndarray]) -> None:
    msg = gossip(tensors)
    spec = spec_for(tensors, max_bytes=max(1, sum(a.nbytes for a in tensors.values())))
    assert_same(validate_and_decode(as_bytes(encode(msg)), spec), msg)


def test_control_message_and_aggregate_up_round_trip() -> None:
    spec = spec_for(adapter())
    hello = gossip({}, type=MessageType.HELLO)
    assert_same(validate_and_decode(as_bytes(encode(hello)), spec), hello)
    up = gossip(adapter(), type=MessageType.AGGREGATE_UP, meta={"samples": 40})
    assert_same(validate_and_decode(as_bytes(encode(up)), spec), up)


def test_layout_packs_small_tensors_aligned_and_keeps_large_ones_apart() -> None:
    half = PACK_BELOW // 2
    layout = frame_layout((3, PACK_BELOW, 8, 0, half, half - PACK_ALIGN))
    assert layout.slots == ((0, 0), (1, 0), (0, PACK_ALIGN), (0, 2 * PACK_ALIGN), (0, 2 * PACK_ALIGN), (2, 0))
    assert layout.frame_bytes == (2 * PACK_ALIGN + half, PACK_BELOW, half - PACK_ALIGN)
    assert layout.packed == (True, False, True)
    assert all(n < PACK_BELOW for n, packed in zip(layout.frame_bytes, layout.packed) if packed)


def test_decoded_arrays_are_views_of_received_frames() -> None:
    frames = as_bytes(encode(gossip(adapter())))
    decoded = validate_and_decode(frames, spec_for(adapter()))
    packed, wide = np.frombuffer(frames[1], np.uint8), np.frombuffer(frames[-1], np.uint8)
    assert np.shares_memory(decoded.tensors["item_emb.lora_wide"], wide)
    assert np.shares_memory(decoded.tensors["item_emb.lora_A"], packed)
    assert not decoded.tensors["item_emb.lora_A"].flags.writeable


def test_encode_refuses_dtypes_the_wire_cannot_carry() -> None:
    with pytest.raises(TypeError, match="float64"):
        encode(gossip({"x": np.zeros(3)}))


def test_spec_refuses_unknown_dtypes() -> None:
    with pytest.raises(ValueError, match="float64"):
        WireSpec({"x": (3,)}, max_bytes=12, allowed_dtypes=frozenset({"float64"}))


# --- rejections ----------------------------------------------------------------------

VALID = as_bytes(encode(gossip(adapter())))
SPEC = spec_for(adapter())


def set_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(key, value)


def edit_entry(name: str, index: int, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        next(e for e in header["tensors"] if e[0] == name)[index] = value

    return edit


def poisoned(name: str, value: float) -> list[bytes]:
    tensors = adapter()
    tensors[name] = tensors[name].copy()
    tensors[name].flat[5] = value
    return as_bytes(encode(gossip(tensors)))


def bf16_with(bits: int) -> tuple[list[bytes], WireSpec]:
    tensors = {"w": np.full((4, 4), 0x3F80, dtype=np.uint16)}  # 1.0 in bfloat16
    tensors["w"][2, 3] = bits
    return as_bytes(encode(gossip(tensors))), spec_for(tensors)


def without_samples(header: dict[str, Any]) -> None:
    header["type"] = int(MessageType.AGGREGATE_UP)


REJECTIONS: dict[str, tuple[list[bytes], str]] = {
    "empty message": ([], "empty"),
    "wrong version": (forge(VALID, set_key("v", PROTOCOL_VERSION + 1)), "version"),
    "version as bool": (forge(VALID, set_key("v", True)), "version"),
    "unknown type": (forge(VALID, set_key("type", 99)), "type"),
    "extra header key": (forge(VALID, set_key("extra", 1)), "keys"),
    "missing header key": (forge(VALID, lambda h: h.pop("codec")), "keys"),
    "header not a map": ([msgpack.packb([1, 2, 3]), *VALID[1:]], "not a map"),
    "truncated header": ([VALID[0][:-5], *VALID[1:]], "msgpack"),
    "garbage header": ([b"\xc1\x00garbage", *VALID[1:]], "msgpack"),
    "trailing header bytes": ([VALID[0] + b"\x00", *VALID[1:]], "msgpack"),
    "oversized header frame": ([VALID[0] + b"\x00" * SPEC.max_header_bytes, *VALID[1:]], "header frame"),
    "long string": (forge(VALID, set_key("codec", "c" * 65)), "max_str_len"),
    "missing frame": (VALID[:-1], "frame count"),
    "extra frame": ([*VALID, b"\x00" * 8], "frame count"),
    "wrong tensor name": (forge(VALID, edit_entry("item_emb.lora_B", 0, "stolen")), "name"),
    "duplicate name": (forge(VALID, lambda h: h["tensors"].__setitem__(1, h["tensors"][0])), "duplicate"),
    "missing tensor": (forge(VALID, lambda h: h["tensors"].pop()), "missing"),
    "wrong shape": (forge(VALID, edit_entry("item_emb.lora_B", 2, [8, 64])), "shape"),
    "float dim": (forge(VALID, edit_entry("item_emb.lora_B", 2, [64.0, 8])), "shape"),
    "wrong dtype": (forge(VALID, edit_entry("item_emb.lora_B", 1, "float16")), "dtype"),
    "unknown dtype": (forge(VALID, edit_entry("item_emb.lora_B", 1, "float64")), "dtype"),
    "nbytes disagrees with shape": (forge(VALID, edit_entry("item_emb.lora_B", 3, 4)), "nbytes"),
    "short frame": ([*VALID[:-1], VALID[-1][:-4]], "bytes"),
    "nbytes not an int": (forge(VALID, edit_entry("item_emb.lora_B", 3, [1, 2])), "nbytes"),
    "entry arity": (forge(VALID, lambda h: h["tensors"][0].append(0)), "entry"),
    "unknown sender": (forge(VALID, set_key("sender", 9)), "sender"),
    "sender as bool": (forge(VALID, set_key("sender", True)), "sender"),
    "negative round": (forge(VALID, set_key("round", -1)), "round"),
    "huge round": (forge(VALID, set_key("round", 2**40)), "round"),
    "huge meta": (forge(VALID, set_key("meta", {f"k{i}": i for i in range(9)})), "max_map_len"),
    "long meta string": (forge(VALID, set_key("meta", {"k": "v" * 65})), "max_str_len"),
    "nested meta": (forge(VALID, set_key("meta", {"k": [1, 2]})), "meta"),
    "non-finite meta": (forge(VALID, set_key("meta", {"lr": float("nan")})), "meta"),
    "aggregate without samples": (forge(VALID, without_samples), "samples"),
    "exchange 0 named": (forge(VALID, set_key("meta", {"exchange": 0})), "exchange"),
    "exchange beyond the cap": (forge(VALID, set_key("meta", {"exchange": 16})), "exchange"),
    "exchange as a string": (forge(VALID, set_key("meta", {"exchange": "1"})), "exchange"),
    "hello with tensors": (forge(VALID, set_key("type", int(MessageType.HELLO))), "no tensors"),
    "NaN": (poisoned("item_emb.lora_A", float("nan")), "non-finite"),
    "+Inf": (poisoned("item_emb.lora_wide", float("inf")), "non-finite"),
    "bf16 NaN": (bf16_with(BF16_NAN)[0], "non-finite"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejects(case: str) -> None:
    frames, word = REJECTIONS[case]
    spec = bf16_with(0)[1] if case.startswith("bf16") else SPEC
    with pytest.raises(WireError, match=word) as info:
        validate_and_decode(frames, spec)
    assert "\n" not in str(info.value)


def test_rejects_oversize_total_before_reading_frames() -> None:
    small = spec_for(adapter(), max_bytes=1000)
    with pytest.raises(WireError, match="limit"):
        validate_and_decode(VALID[:1], small)  # no payload frames needed to refuse


@pytest.mark.parametrize("bits", [BF16_INF, BF16_INF | 0x8000, BF16_NAN | 0x8000])
def test_rejects_bf16_infinities(bits: int) -> None:
    frames, spec = bf16_with(bits)
    with pytest.raises(WireError, match="non-finite"):
        validate_and_decode(frames, spec)


@pytest.mark.parametrize("value", [float("-inf"), float("nan")])
def test_rejects_float16_non_finite(value: float) -> None:
    tensors = {"h": np.ones(6, dtype=np.float16)}
    tensors["h"][3] = value
    with pytest.raises(WireError, match="non-finite"):
        validate_and_decode(as_bytes(encode(gossip(tensors))), spec_for(tensors))


def test_long_strings_are_refused_even_when_tensor_names_are_long() -> None:
    name = "base_model.model.encoder.layer.0.attention.self.query.lora_A.shared.weight"
    tensors = {name: np.ones((2, 2), np.float32)}
    frames = as_bytes(encode(gossip(tensors, codec="c" * 65)))
    with pytest.raises(WireError, match="codec"):
        validate_and_decode(frames, spec_for(tensors))


# --- remembered tensor tables ---------------------------------------------------------


def raw_header(pairs: list[tuple[object, object]], tail: bytes = b"") -> bytes:
    """A header map written pair by pair, so keys may repeat and values be anything."""
    packer = msgpack.Packer()
    return packer.pack_map_header(len(pairs)) + b"".join(packer.pack(k) + packer.pack(v) for k, v in pairs) + tail


def test_a_remembered_table_still_gets_every_per_message_check() -> None:
    spec = spec_for(adapter())
    validate_and_decode(VALID, spec)  # the table is now remembered
    assert len(spec.checked_tables) == 1
    for edit, word in [
        (set_key("type", int(MessageType.HELLO)), "no tensors"),
        (set_key("sender", 9), "sender"),
        (set_key("round", -1), "round"),
        (edit_entry("item_emb.lora_B", 2, [64.0, 8]), "shape"),  # equal to the remembered one in Python
        (edit_entry("item_emb.lora_B", 3, True), "nbytes"),
    ]:
        with pytest.raises(WireError, match=word):
            validate_and_decode(forge(VALID, edit), spec)
    for frames, word in [(VALID[:-1], "frame count"), ([*VALID[:-1], VALID[-1][:-4]], "bytes"),
                         (poisoned("item_emb.lora_wide", -np.inf), "non-finite")]:
        with pytest.raises(WireError, match=word):
            validate_and_decode(frames, spec)
    assert len(spec.checked_tables) == 1  # the same table bytes throughout


def test_remembered_tables_are_bounded() -> None:
    names = ("a", "b", "c", "d", "e")
    spec = WireSpec({name: (1,) for name in names}, max_bytes=4000)
    for order in itertools.islice(itertools.permutations(names), 40):  # 40 distinct tables
        tensors = {name: np.full(1, 0.5, np.float32) for name in order}
        assert_same(validate_and_decode(as_bytes(encode(gossip(tensors))), spec), gossip(tensors))
    assert len(spec.checked_tables) <= 16


@pytest.mark.parametrize(
    ("frame0", "word"),
    [
        (raw_header([("v", PROTOCOL_VERSION), ("v", PROTOCOL_VERSION)]), "duplicate"),
        (raw_header([("v", PROTOCOL_VERSION), (b"", 1)]), "keys"),  # the only bytes key max_bin_len allows
        (raw_header([("v", PROTOCOL_VERSION), (b"type", 1)]), "max_bin_len"),
        (raw_header([("v", PROTOCOL_VERSION), (7, 1)]), "map key"),
        (raw_header([(f"k{i}", i) for i in range(9)]), "max_map_len"),
        (raw_header([("v", PROTOCOL_VERSION), ("tensors", [])], tail=b"\x00"), "after the header"),
        (raw_header([("v", PROTOCOL_VERSION), ("tensors", [])])[:-1], "msgpack"),
    ],
)
def test_header_map_rules(frame0: bytes, word: str) -> None:
    with pytest.raises(WireError, match=word):
        validate_and_decode([frame0, *VALID[1:]], SPEC)


@pytest.mark.parametrize(
    ("table", "word"),
    [([["x" * 100, "float32", [1], 4]], "max_str_len"), ([[] for _ in range(40)], "max_array_len"), (7, "list")],
)
def test_tensor_table_gets_msgpack_limits_although_the_header_skips_it(table: object, word: str) -> None:
    with pytest.raises(WireError, match=word):
        validate_and_decode(forge(VALID, set_key("tensors", table)), SPEC)


# --- fuzzing -------------------------------------------------------------------------


def mutations(rng: np.random.Generator) -> list[bytes]:
    """One hostile frame list: random bytes, truncations, bit flips, reshuffled frames."""
    frames = list(VALID)
    kind = rng.integers(6)
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 300))) for _ in range(rng.integers(0, 5))]
    if kind == 1:
        i = int(rng.integers(len(frames)))
        frames[i] = frames[i][: int(rng.integers(0, len(frames[i]) + 1))]
    elif kind in (2, 3):  # bit flips, mostly in the header where they do most harm
        i = 0 if kind == 2 else int(rng.integers(len(frames)))
        flipped = bytearray(frames[i])
        for _ in range(int(rng.integers(1, 6))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        frames[i] = bytes(flipped)
    elif kind == 4:
        frames = [frames[int(j)] for j in rng.integers(0, len(frames), rng.integers(0, 6))]
    else:  # a well-formed header with a few fields, or tensor entry fields, set at random
        header = msgpack.unpackb(frames[0])
        entries = header["tensors"]
        values = [1, -1, 2**63, 0.5, float("nan"), "x", [], {}, None, True, [8, 64], {"samples": -3}]
        for _ in range(int(rng.integers(1, 3))):
            target = header if rng.random() < 0.5 else entries[int(rng.integers(len(entries)))]
            key = rng.choice(list(header)) if target is header else int(rng.integers(4))
            target[key] = values[int(rng.integers(len(values)))]
        frames[0] = msgpack.packb(header)
    return frames


def test_fuzz_only_wire_errors_escape() -> None:
    rng = np.random.default_rng(2024)
    accepted = 0
    for _ in range(4000):
        frames = mutations(rng)
        try:
            msg = validate_and_decode(frames, SPEC)
        except WireError:
            continue
        accepted += 1
        assert {n: a.shape for n, a in msg.tensors.items()} == SPEC.tensors
        assert all(np.isfinite(a).all() for a in msg.tensors.values())
    assert accepted > 0  # payload bit flips that stay finite are legitimate messages


# --- real sockets --------------------------------------------------------------------


def test_zmq_round_trip_router_dealer() -> None:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = 8
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        sent = gossip(adapter(), type=MessageType.AGGREGATE_UP, meta={"samples": 40})
        dealer.send_multipart(encode(sent), copy=False)
        assert router.poll(5000), "no message within 5 s"
        identity, *frames = router.recv_multipart(copy=False)
        received = validate_and_decode(frames, SPEC)
        assert_same(received, sent)
        wide = np.frombuffer(frames[-1].buffer, np.uint8)
        assert np.shares_memory(received.tensors["item_emb.lora_wide"], wide)

        reply = gossip(adapter(1), type=MessageType.AGGREGATE_DOWN, sender=1)
        router.send_multipart([identity, *encode(reply)], copy=False)
        assert dealer.poll(5000), "no reply within 5 s"
        assert_same(validate_and_decode(dealer.recv_multipart(copy=False), SPEC), reply)
    finally:
        router.close()
        dealer.close()
        ctx.term()
