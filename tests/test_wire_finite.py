"""The NaN/Inf scan: its one-pass float32 screen must never let a non-finite value through,
and its fallback must never reject a finite one, wherever the value sits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from p2prec.wire import Message, MessageType, WireError, WireSpec, encode, validate_and_decode
from p2prec.wire.finite import all_finite, first_non_finite

F32_SPECIALS = {
    "+inf": 0x7F800000,
    "-inf": 0xFF800000,
    "quiet nan": 0x7FC00000,
    "negative nan": 0xFFC00000,
    "signalling nan": 0x7F800001,
    "nan, all mantissa bits": 0x7FFFFFFF,
}


def finite(values: np.ndarray, tag: str = "float32") -> bool:
    """``first_non_finite`` over one run holding all of ``values``."""
    data = memoryview(np.ascontiguousarray(values)).cast("B")
    return first_non_finite([data], [(tag, 0, 0, data.nbytes)]) is None


def with_bits(n: int, at: int, bits: int) -> np.ndarray:
    values = np.ones(n, np.float32)
    values.view(np.uint32)[at] = bits
    return values


@pytest.mark.parametrize("name", sorted(F32_SPECIALS))
def test_float32_special_caught_at_every_position_of_short_runs(name: str) -> None:
    # Lengths past a few SIMD widths, so every lane and the scalar tail are covered.
    for n in range(1, 70):
        for at in range(n):
            assert not finite(with_bits(n, at, F32_SPECIALS[name])), (n, at)


@pytest.mark.parametrize("name", sorted(F32_SPECIALS))
def test_float32_special_caught_first_middle_and_last_in_a_large_run(name: str) -> None:
    n = 1_000_003  # odd, so the last element is in a tail, not a full vector
    for at in (0, n // 2, n - 2, n - 1):
        assert not finite(with_bits(n, at, F32_SPECIALS[name])), at


def test_finite_extremes_that_overflow_the_screen_are_accepted_without_warnings() -> None:
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    values = np.array([big, -big, tiny, -tiny, 0.0, -0.0] * 1000, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finite(values)
        values[-1] = np.inf
        assert not finite(values)
        assert not finite(with_bits(5, 2, F32_SPECIALS["signalling nan"]))


def test_empty_run_is_finite() -> None:
    assert finite(np.zeros(0, np.float32))


def bfloat16_reference(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening the bits gives its value."""
    return np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("tag", ["float16", "bfloat16"])
def test_every_16_bit_pattern_agrees_with_isfinite(tag: str) -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    expected = np.isfinite(bits.view(np.float16)) if tag == "float16" else bfloat16_reference(bits)
    ones = np.full(9, 0x3C00 if tag == "float16" else 0x3F80, np.uint16)  # 1.0
    for pattern, ok in zip(bits, expected):
        ones[-1] = pattern  # last element, in a run longer than one vector lane
        assert all_finite(memoryview(ones).cast("B"), tag) == ok, hex(pattern)


def test_first_non_finite_names_the_bad_run_and_skips_good_ones() -> None:
    good, bad = np.ones(16, np.float32), with_bits(16, 15, F32_SPECIALS["-inf"])
    frame = memoryview(np.concatenate([good, bad])).cast("B")
    runs = [("float32", 0, 0, 64), ("float32", 0, 64, 128)]
    assert first_non_finite([frame], runs) == runs[1]
    assert first_non_finite([frame], runs[:1]) is None


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_validator_rejects_non_finite_in_the_last_element_of_a_large_tensor(value: float) -> None:
    tensors = {"small": np.ones((8, 64), np.float32), "wide": np.ones((8, 100_000), np.float32)}
    tensors["wide"][-1, -1] = value
    msg = Message(MessageType.GOSSIP, sender=1, round=1, codec="none", tensors=tensors)
    spec = WireSpec({k: v.shape for k, v in tensors.items()}, max_bytes=sum(v.nbytes for v in tensors.values()))
    frames = [bytes(f) for f in encode(msg)]
    with pytest.raises(WireError, match="non-finite float32"):
        validate_and_decode(frames, spec)
    tensors["wide"][-1, -1] = np.finfo(np.float32).max
    frames = [bytes(f) for f in encode(msg)]
    np.testing.assert_array_equal(validate_and_decode(frames, spec).tensors["wide"], tensors["wide"])
