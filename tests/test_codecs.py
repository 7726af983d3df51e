"""Codecs: error bounds, real wire sizes, error feedback, hostile payloads, stacked = per node."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from p2prec.config import ConfigError, load
from p2prec.gossip.codecs import (
    STAGES,
    Codec,
    CodecError,
    CodecOptions,
    ErrorFeedback,
    codec_from_config,
    get_codec,
    parse,
)
from p2prec.wire import Message, MessageType, WireError, encode, validate_and_decode

# The shapes of the real shared adapter (rank 8 on query, value and the item embedding of
# ML-100K, hidden 64, 2 layers): 18,072 floats under peft's long parameter names.
PREFIX = "base_model.model.backbone.encoder.layer"
SHAPES = {
    "base_model.model.item_emb.lora_embedding_A.shared": (8, 1683),
    "base_model.model.item_emb.lora_embedding_B.shared": (64, 8),
    **{f"{PREFIX}.{i}.attention.self.{p}.lora_A.shared.weight": (8, 64) for i in range(2) for p in ("query", "value")},
    **{f"{PREFIX}.{i}.attention.self.{p}.lora_B.shared.weight": (64, 8) for i in range(2) for p in ("query", "value")},
}
PIPELINES = ["none", "fp16", "bf16", "int8", "int4", "topk", "topk+fp16", "topk+bf16", "topk+int8", "topk+int4"]


def adapter(seed: int = 0, n: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    return {name: 0.1 * torch.randn(*lead, *shape, generator=g) for name, shape in SHAPES.items()}


def wire_bytes(payload: dict[str, np.ndarray], codec: str) -> int:
    frames = encode(Message(MessageType.GOSSIP, 1, 3, codec, payload))
    return sum(memoryview(f).nbytes for f in frames)


def test_pipeline_names_and_order_rules() -> None:
    assert parse("none") == []
    assert parse("topk+int8") == ["topk", "int8"]
    assert get_codec(["topk", "bf16"]).name == "topk+bf16"
    assert get_codec("none").name == "none"
    for bad in ("int9", "int8+topk", "fp16+int8", "topk+topk", "none+int8", ""):
        with pytest.raises(CodecError):
            parse(bad)
    assert set(STAGES) == {"fp16", "bf16", "int8", "int4", "topk"}


@pytest.mark.parametrize("name", PIPELINES)
def test_every_codec_survives_the_real_wire(name: str) -> None:
    codec = get_codec(name, CodecOptions(topk_fraction=0.05, quant_block=256))
    x = adapter()
    payload = codec.encode(x)
    frames = [bytes(f) for f in encode(Message(MessageType.GOSSIP, 1, 3, codec.name, payload))]
    msg = validate_and_decode(frames, codec.wire_spec(SHAPES, known_senders=frozenset({1})))
    assert msg.codec == name
    direct = codec.decode(payload, SHAPES)
    received = get_codec(msg.codec, CodecOptions(topk_fraction=0.05, quant_block=256)).decode(msg.tensors, SHAPES)
    for k in SHAPES:
        assert received[k].dtype == torch.float32 and received[k].shape == SHAPES[k]
        assert torch.equal(received[k], direct[k])


def test_fp16_and_bf16_relative_error() -> None:
    x = adapter()
    # Half an ulp relative to the value; fp16's subnormals (below 2**-14) have a fixed
    # spacing of 2**-24 instead, which bf16, with float32's exponent range, never reaches.
    for name, rel, floor in (("fp16", 2**-11, 2**-25), ("bf16", 2**-8, 0.0)):
        y = get_codec(name).decode(get_codec(name).encode(x), SHAPES)
        for k in x:
            assert ((y[k] - x[k]).abs() <= rel * x[k].abs() + floor).all(), name


def test_fp16_saturates_instead_of_overflowing() -> None:
    x = {"w": torch.tensor([1e6, -1e6, 1.0])}
    y = get_codec("fp16").decode(get_codec("fp16").encode(x), {"w": (3,)})["w"]
    assert torch.isfinite(y).all() and y[0] == 65504.0 and y[1] == -65504.0


@pytest.mark.parametrize("block", [0, 64, 100])
@pytest.mark.parametrize("name, levels", [("int8", 127), ("int4", 7)])
def test_integer_codes_err_by_at_most_half_a_scale(name: str, levels: int, block: int) -> None:
    codec = get_codec(name, CodecOptions(quant_block=block))
    x = adapter(1)
    payload = codec.encode(x)
    y = codec.decode(payload, SHAPES)
    scales = torch.from_numpy(payload[f"{name}.scales"])
    offset = 0
    for k in sorted(SHAPES):
        flat, err = x[k].reshape(-1), (y[k] - x[k]).reshape(-1)
        size = block or flat.numel()
        blocks = math.ceil(flat.numel() / size)
        s = scales[offset:offset + blocks].repeat_interleave(size)[: flat.numel()]
        offset += blocks
        assert torch.allclose(s, torch.nn.functional.pad(flat, (0, blocks * size - flat.numel()))
                              .reshape(blocks, size).abs().amax(1).repeat_interleave(size)[: flat.numel()] / levels)
        assert (err.abs() <= s / 2 * (1 + 1e-5)).all()
    assert offset == scales.numel()


def test_blockwise_int8_is_more_accurate_on_uneven_magnitudes() -> None:
    x = {"w": torch.cat([torch.randn(512) * 1e-3, torch.randn(512) * 10.0])}
    err = {}
    for block in (0, 128):
        codec = get_codec("int8", CodecOptions(quant_block=block))
        err[block] = float((codec.decode(codec.encode(x), {"w": (1024,)})["w"] - x["w"])[:512].abs().max())
    assert err[128] < err[0] / 100


def test_int4_packs_two_codes_a_byte_and_pads_an_odd_tensor_with_zero() -> None:
    x = {"w": torch.tensor([[7.0, -7.0, 1.0], [0.0, -1.0, 3.0], [2.0, 5.0, -3.0]])}
    codec = get_codec("int4")
    payload = codec.encode(x)
    assert payload["w"].dtype == np.uint8 and payload["w"].shape == (5,)
    # The scale is 1, so codes equal values: 7 and -7 are nibbles 15 and 1 (byte 0x1F); the
    # ninth code, -3 (nibble 5), shares the last byte with the padding nibble 8 (zero).
    assert payload["w"][0] == 0x1F and payload["w"][-1] == 0x85
    assert torch.equal(codec.decode(payload, {"w": (3, 3)})["w"], x["w"])
    payload["w"][-1] = 0x95
    with pytest.raises(CodecError, match="padding of the last int4 byte"):
        codec.decode(payload, {"w": (3, 3)})
    payload["w"][-1] = 0x80
    with pytest.raises(CodecError, match="code -8 is outside"):
        codec.decode(payload, {"w": (3, 3)})


def test_int8_of_zeros_is_exact() -> None:
    x = {"w": torch.zeros(10, 3)}
    codec = get_codec("int8")
    assert torch.equal(codec.decode(codec.encode(x), {"w": (10, 3)})["w"], x["w"])


def test_int8_is_more_than_3_5x_smaller_than_fp32_on_the_wire() -> None:
    x = adapter()
    assert sum(math.prod(s) for s in SHAPES.values()) == 18072
    fp32 = wire_bytes(get_codec("none").encode(x), "none")
    for block in (0, 256):
        int8 = wire_bytes(get_codec("int8", CodecOptions(quant_block=block)).encode(x), "int8")
        assert fp32 / int8 >= 3.5, (block, fp32, int8)
    topk = wire_bytes(get_codec("topk+int8", CodecOptions(topk_fraction=0.1)).encode(x), "topk+int8")
    assert fp32 / topk >= 7  # 10% of the values at one byte, plus an int32 index each


def test_topk_keeps_the_largest_entries() -> None:
    x = {"a": torch.tensor([[0.1, -5.0], [0.2, 0.0]]), "b": torch.tensor([3.0, -0.3, 4.0])}
    codec = get_codec("topk", CodecOptions(topk_fraction=3 / 7))
    payload = codec.encode(x)
    assert payload["topk.indices"].tolist() == [1, 4, 6]
    y = codec.decode(payload, {"a": (2, 2), "b": (3,)})
    assert y["a"].tolist() == [[0.0, -5.0], [0.0, 0.0]] and y["b"].tolist() == [3.0, 0.0, 4.0]


@pytest.mark.parametrize("name", ["topk", "topk+int8"])
def test_error_feedback_makes_the_sum_of_sent_track_the_sum_of_inputs(name: str) -> None:
    codec = get_codec(name, CodecOptions(topk_fraction=0.02))
    feedback = ErrorFeedback()
    g = torch.Generator().manual_seed(3)
    total_in = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total_sent = {k: torch.zeros(s) for k, s in SHAPES.items()}
    without = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for _ in range(200):
        x = {k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        sent = codec.decode(codec.encode(x, feedback), SHAPES)
        plain = codec.decode(codec.encode(x), SHAPES)
        for k in SHAPES:
            total_in[k] += x[k]
            total_sent[k] += sent[k]
            without[k] += plain[k]
            assert torch.allclose(total_in[k] - total_sent[k], feedback.residual[k], atol=1e-4)

    def gap(a: dict[str, torch.Tensor]) -> float:
        return float(sum((a[k] - total_in[k]).pow(2).sum() for k in SHAPES).sqrt())

    scale = float(sum(v.pow(2).sum() for v in total_in.values()).sqrt())
    assert gap(total_sent) < 0.35 * scale  # bounded by the residual, which does not grow
    assert gap(without) > 0.9 * scale  # without feedback, small coordinates never get through


@pytest.mark.parametrize("name", PIPELINES)
def test_stacked_roundtrip_equals_each_node_alone(name: str) -> None:
    codec = get_codec(name, CodecOptions(topk_fraction=0.05, quant_block=128))
    stacked = adapter(5, n=4)
    stacked_feedback, node_feedback = ErrorFeedback(), [ErrorFeedback() for _ in range(4)]
    for _ in range(3):
        together = codec.roundtrip(stacked, stacked_feedback)
        for i in range(4):
            alone = codec.decode(codec.encode({k: v[i] for k, v in stacked.items()}, node_feedback[i]), SHAPES)
            for k in SHAPES:
                assert torch.equal(together[k][i], alone[k])
                assert torch.equal(stacked_feedback.residual[k][i], node_feedback[i].residual[k])


def tamper(name: str, edit: str) -> tuple[Codec, dict[str, np.ndarray]]:
    codec = get_codec(name, CodecOptions(topk_fraction=0.05, quant_block=64))
    payload = {k: v.copy() for k, v in codec.encode(adapter()).items()}
    if edit == "index-out-of-range":
        payload["topk.indices"][-1] = 18072
    elif edit == "negative-index":
        payload["topk.indices"][0] = -1
    elif edit == "duplicate-index":
        payload["topk.indices"][1] = payload["topk.indices"][0]
    elif edit == "unsorted-index":
        payload["topk.indices"][[0, 1]] = payload["topk.indices"][[1, 0]]
    elif edit == "short":
        payload["topk.values"] = payload["topk.values"][:-1]
    elif edit == "negative-scale":
        payload["int8.scales"][0] = -1.0
    elif edit == "nan-scale":
        payload["int8.scales"][0] = np.nan
    elif edit == "int8-minus-128":
        first = sorted(SHAPES)[0]
        payload[first][0, 0] = -128
    elif edit == "int4-minus-8":
        first = sorted(SHAPES)[0]
        payload[first][0] &= 0xF0
    elif edit == "wrong-dtype":
        first = sorted(SHAPES)[0]
        payload[first] = payload[first].astype(np.int32)
    elif edit == "missing":
        del payload["int8.scales"]
    elif edit == "extra":
        payload["evil"] = np.zeros(1, np.float32)
    elif edit == "inf-fp16":
        first = sorted(SHAPES)[0]
        payload[first][0, 0] = np.inf
    return codec, payload


@pytest.mark.parametrize("name, edit, words", [
    ("topk", "index-out-of-range", "outside"),
    ("topk", "negative-index", "outside"),
    ("topk", "duplicate-index", "strictly increasing"),
    ("topk", "unsorted-index", "strictly increasing"),
    ("topk", "short", "expected float32[904]"),
    ("int8", "negative-scale", "non-negative"),
    ("int8", "nan-scale", "finite"),
    ("int8", "int8-minus-128", "-128"),
    ("int8", "wrong-dtype", "int32"),
    ("int4", "int4-minus-8", "-8"),
    ("int8", "missing", "missing ['int8.scales']"),
    ("int8", "extra", "extra ['evil']"),
    ("fp16", "inf-fp16", "not finite"),
])
def test_hostile_payloads_are_rejected_in_one_line(name: str, edit: str, words: str) -> None:
    codec, payload = tamper(name, edit)
    with pytest.raises(CodecError) as info:
        codec.decode(payload, SHAPES)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, WireError)


def test_a_mismatched_fraction_is_a_shape_error_not_garbage() -> None:
    sender = get_codec("topk", CodecOptions(topk_fraction=0.1))
    receiver = get_codec("topk", CodecOptions(topk_fraction=0.05))
    with pytest.raises(CodecError, match=r"'topk.values' is float32\[1808\], expected float32\[904\]"):
        receiver.decode(sender.encode(adapter()), SHAPES)
    frames = [bytes(f) for f in encode(Message(MessageType.GOSSIP, 1, 0, "topk", sender.encode(adapter())))]
    with pytest.raises(WireError, match="shape"):
        validate_and_decode(frames, receiver.wire_spec(SHAPES))


def test_reserved_names_are_refused() -> None:
    with pytest.raises(CodecError, match="reserved"):
        get_codec("int8").payload_spec({"int8.scales": (3,)})


def test_config_names_the_key_of_an_unknown_codec() -> None:
    assert codec_from_config(load(None, ["gossip.codec=topk+int8"]).gossip).name == "topk+int8"
    with pytest.raises(ConfigError, match=r"^gossip.codec: unknown codec 'int9'"):
        codec_from_config(load(None, ["gossip.codec=int9"]).gossip)
    with pytest.raises(ConfigError, match=r"^gossip.codec: .*topk first"):
        codec_from_config(load(None, ["gossip.codec=int8+topk"]).gossip)


@pytest.mark.parametrize("name", ["none", "int4", "topk+int8"])
def test_numbered_names_carry_the_same_message_in_fewer_bytes(name: str) -> None:
    """``gossip.wire_names = "index"``: the payload travels as ``"0:<digest>", "1", ...`` and
    decodes to exactly what the named payload decodes to, through the real wire and its spec."""
    options = CodecOptions(topk_fraction=0.05, quant_block=64)
    named, numbered = get_codec(name, options), get_codec(name, CodecOptions(0.05, 64, indexed=True))
    payload = numbered.encode(adapter())
    first, *rest = payload
    assert first.startswith("0:") and len(first) == 10 and rest == [str(i) for i in range(1, len(payload))]
    frames = encode(Message(MessageType.GOSSIP, 1, 3, name, payload))
    received = validate_and_decode([bytes(f) for f in frames], numbered.wire_spec(SHAPES))
    expected = named.decode(named.encode(adapter()), SHAPES)
    for k, v in numbered.decode(received.tensors, SHAPES).items():
        assert torch.equal(v, expected[k])
    long = named.encode(adapter())
    saved = wire_bytes(long, name) - wire_bytes(payload, name)
    assert saved >= sum(map(len, long)) - sum(map(len, payload)) - 2 * len(payload) > 0  # msgpack string heads
    assert not numbered.passthrough and (named.passthrough == (name == "none"))


def test_numbered_names_refuse_another_layout_and_named_payloads() -> None:
    """A sender whose adapter differs only in a name (same shapes) sends another digest; a
    named payload is not a numbered one (its long names overrun the header bounds the numbered
    spec sets); both fail the receiver's wire spec and its decode."""
    receiver = get_codec("int4", CodecOptions(quant_block=64, indexed=True))
    renamed = {k.replace("query", "key"): v for k, v in adapter().items()}
    for payload in (receiver.encode(renamed), get_codec("int4", CodecOptions(quant_block=64)).encode(adapter())):
        with pytest.raises(CodecError, match="payload names wrong") as info:
            receiver.decode(payload, SHAPES)
        assert "\n" not in str(info.value)
        frames = [bytes(f) for f in encode(Message(MessageType.GOSSIP, 1, 0, "int4", payload))]
        with pytest.raises(WireError, match="unexpected tensor name|max_str_len"):
            validate_and_decode(frames, receiver.wire_spec(SHAPES))


def test_wire_names_come_from_the_config() -> None:
    assert codec_from_config(load(None, ["gossip.wire_names=index"]).gossip).indexed
    assert not codec_from_config(load(None).gossip).indexed
    with pytest.raises(ConfigError, match="wire_names"):
        load(None, ["gossip.wire_names=short"])
