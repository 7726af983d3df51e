"""Compression codecs for the shared adapter: stages registered by name, applied as a pipeline.

One implementation serves both worlds. A real node calls :meth:`Codec.encode` on its own
tensors, puts the payload in a :class:`p2prec.wire.Message` whose ``codec`` field is
:attr:`Codec.name`, and a receiver calls :meth:`Codec.decode` on what
:func:`p2prec.wire.validate_and_decode` returned. The simulator calls
:meth:`Codec.roundtrip` on the stacked ``[N, ...]`` tensors of all senders at once and gets
exactly what each receiver would decode; it counts bytes by encoding one node's real
payload with :func:`p2prec.wire.encode`. Both paths run the same stage code: every stage
works on tensors with a leading batch dimension, and one node is a batch of one.

Stages, and what they put on the wire:

- ``fp16``, ``bf16``: each float32 tensor as 16-bit floats under its own name (values
  beyond the 16-bit range saturate, so an honest message is always finite);
- ``int8``: each float32 tensor as int8 in ``[-127, 127]`` under its own name, plus one
  float32 tensor ``int8.scales`` holding every scale in payload order. The scale is
  ``max|x| / 127`` per tensor (``quant_block = 0``) or per block of ``quant_block``
  consecutive elements of each flattened tensor, so the error is at most half a scale per
  element. One shared scales tensor, rather than one per tensor, keeps the header small:
  for the real adapter (ten tensors with long peft names) the header is already 1 KB of a
  19 KB int8 message, and a scales entry per tensor would double it;
- ``int4``: the same with codes in ``[-7, 7]``, packed two to a byte as ``ceil(numel / 2)``
  uint8 under the tensor's name, scales in ``int4.scales`` (``quant_block`` sets its blocks too);
- ``topk``: the ``k = ceil(fraction * D)`` largest-magnitude entries of the whole adapter
  flattened in name order (``D`` elements), as ``topk.values`` (float32) and
  ``topk.indices`` (int32, strictly increasing). ``k`` depends only on ``D`` and the
  fraction, so payload shapes are fixed and the receiver checks them exactly.

Names on the wire: by default each payload tensor travels under its own name (the peft
names of the adapter, ``track.`` before a tracker's, and the stages' own). With
``gossip.wire_names = "index"`` it travels under its position in the payload instead, and the
first name also carries a digest of the whole payload layout (every name, dtype and shape, in
order): ``"0:1f2e3d4c", "1", "2", ...``. Why: the peft names are 4.4 KB of a 78 KB int4
message of the default adapter; a layout both ends derive from one config says the same in 11
bytes. The receiver's wire spec holds the numbered names, so a message is checked exactly as
before (every name, dtype and shape), and a sender whose layout differs anywhere, even in a
name alone (another target with the same shapes), sends another digest and is rejected.

A pipeline is at most one ``topk`` followed by at most one quantiser (``fp16``, ``bf16``,
``int8`` or ``int4``), named by joining stage names with ``+`` (``"topk+int8"``); ``"none"`` is
the empty pipeline, plain float32 under the adapter's own names. Receiver and sender must
share ``topk_fraction`` and ``quant_block``: the name does not carry them, one config does.
A different fraction changes ``k`` and a different block size the number of scales, so
the payload has the wrong shape and is rejected; only two block sizes that cut every
tensor into the same number of blocks would go unnoticed.

Error feedback: a lossy sender may keep what its messages did not carry in an
:class:`ErrorFeedback` and add it to the next input, so that over many rounds the sum of
what was sent tracks the sum of the inputs. Top-k without it loses small coordinates
forever, and under gradient tracking any lossy codec keeps one (:meth:`Codec.keeps_residual`).
The state is explicit so the simulator holds all senders' residuals stacked
``[N, ...]`` and a node holds its own; it belongs to the sender and never travels. It
suits a stream whose sum matters: updates (deltas), or tracked states, whose sum is the invariant.

Received bytes are hostile: :meth:`Codec.decode` checks names, dtypes and shapes against
:meth:`Codec.payload_spec`, then each stage checks its own invariants (code range, scales
finite and non-negative, indices strictly increasing and in range) and the result is
checked finite. Every failure is a one-line :class:`CodecError`.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from p2prec.wire import WIRE_DTYPES, WireError, WireSpec

from p2prec.config import ConfigError, GossipConfig

Batch = dict[str, torch.Tensor]
"""Named tensors that all carry a leading batch dimension (senders)."""
Shapes = Mapping[str, Sequence[int]]

class CodecError(WireError):
    """A payload that its codec cannot have produced; the message names the rule, in one line."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One payload tensor as the receiver expects it: wire dtype tag and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


PayloadSpec = dict[str, TensorSpec]


@dataclass
class ErrorFeedback:
    """A sender's residual: what its messages have not carried yet, per input tensor.

    Empty until the first encode. A node keeps one with its own tensor shapes; the
    simulator keeps one whose tensors are stacked ``[N, ...]`` over senders. Pass the
    same object to every encode of one stream; it is updated in place.
    """

    residual: dict[str, torch.Tensor] = field(default_factory=dict)


class Stage(ABC):
    """One transformation of a payload; works on a batch of senders at once.

    ``out_spec`` says what the stage makes of a payload spec. ``decode`` receives a batch
    that already has exactly ``out_spec(spec)``'s names, dtypes and shapes, and must check
    everything else about it that could break the inversion.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    """``"sparsify"`` or ``"quantize"``: a pipeline has at most one of each, sparsifier first."""

    @classmethod
    @abstractmethod
    def from_options(cls, options: CodecOptions) -> Stage: ...

    @abstractmethod
    def out_spec(self, spec: PayloadSpec) -> PayloadSpec: ...

    @abstractmethod
    def encode(self, x: Batch) -> Batch: ...

    @abstractmethod
    def decode(self, y: Batch, spec: PayloadSpec) -> Batch: ...


@dataclass(frozen=True)
class CodecOptions:
    """The stage parameters, which sender and receiver must share (one config)."""

    topk_fraction: float = 0.1
    quant_block: int = 0
    indexed: bool = False
    """Payload tensors travel under numbered names with a layout digest (module docstring)."""


def _floats(spec: PayloadSpec) -> list[str]:
    """The float32 entries of a spec, in payload order: what quantisers transform."""
    return [name for name, t in spec.items() if t.dtype == "float32"]


def _claim(spec: PayloadSpec, *names: str) -> None:
    """Refuse input names that collide with names a stage generates."""
    taken = sorted(set(names) & spec.keys())
    if taken:
        raise CodecError(f"tensor names {taken} are reserved by the codec")


class Cast16(Stage):
    """float32 to a 16-bit float type, saturating at its largest finite value."""

    kind = "quantize"
    tag: ClassVar[str]
    dtype: ClassVar[torch.dtype]

    @classmethod
    def from_options(cls, options: CodecOptions) -> Stage:
        return cls()

    def out_spec(self, spec: PayloadSpec) -> PayloadSpec:
        return {name: TensorSpec(self.tag, t.shape) if t.dtype == "float32" else t for name, t in spec.items()}

    def encode(self, x: Batch) -> Batch:
        top = torch.finfo(self.dtype).max
        return {name: v.clamp(-top, top).to(self.dtype) if v.dtype == torch.float32 else v
                for name, v in x.items()}

    def decode(self, y: Batch, spec: PayloadSpec) -> Batch:
        return {name: v.float() if spec[name].dtype == "float32" else v for name, v in y.items()}


class Fp16(Cast16):
    name = "fp16"
    tag = "float16"
    dtype = torch.float16


class Bf16(Cast16):
    name = "bf16"
    tag = "bfloat16"
    dtype = torch.bfloat16


class Uniform(Stage):
    """Uniform symmetric quantisation to ``[-levels, levels]``, one scale per tensor or per block.

    The integer codes travel as :meth:`pack` lays them out; subclasses choose the width.
    """

    kind = "quantize"
    levels: ClassVar[int]
    SCALES: ClassVar[str]

    def __init__(self, block: int) -> None:
        if block < 0:
            raise CodecError(f"{self.name} block size must be >= 0 (0 = one scale per tensor), got {block}")
        self.block = block

    @classmethod
    def from_options(cls, options: CodecOptions) -> Stage:
        return cls(options.quant_block)

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block) if self.block else min(numel, 1)

    @abstractmethod
    def packed_spec(self, shape: tuple[int, ...]) -> TensorSpec:
        """How the codes of a float32 tensor of ``shape`` travel."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Codes ``[B, numel]`` (int8 within the levels) as the wire tensor ``[B, *packed shape]``."""

    @abstractmethod
    def unpack(self, packed: torch.Tensor, name: str, numel: int) -> torch.Tensor:
        """The wire tensor back to codes ``[B, numel]``; :class:`CodecError` if a code is out of range."""

    def out_spec(self, spec: PayloadSpec) -> PayloadSpec:
        _claim(spec, self.SCALES)
        out = {name: self.packed_spec(t.shape) if t.dtype == "float32" else t for name, t in spec.items()}
        scales = sum(self._blocks(math.prod(spec[name].shape)) for name in _floats(spec))
        return {**out, self.SCALES: TensorSpec("float32", (scales,))}

    def _blocked(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` as ``[B, blocks, size]``, zero-padded at the end."""
        numel = flat.shape[1]
        size = self.block or max(numel, 1)
        blocks = self._blocks(numel)
        padded = torch.nn.functional.pad(flat, (0, blocks * size - numel))
        return padded.reshape(flat.shape[0], blocks, size)

    def encode(self, x: Batch) -> Batch:
        out: Batch = {}
        scales = []
        for name, v in x.items():
            if v.dtype != torch.float32:
                out[name] = v
                continue
            blocked = self._blocked(v.reshape(v.shape[0], -1))
            scale = blocked.abs().amax(dim=2) / float(self.levels)
            safe = torch.where(scale > 0, scale, 1.0).unsqueeze(2)
            q = torch.round(blocked / safe).clamp(-self.levels, self.levels).to(torch.int8)
            out[name] = self.pack(q.reshape(v.shape[0], -1)[:, : math.prod(v.shape[1:])], tuple(v.shape[1:]))
            scales.append(scale)
        out[self.SCALES] = torch.cat(scales, dim=1) if scales else torch.zeros(next(iter(x.values())).shape[0], 0)
        return out

    def decode(self, y: Batch, spec: PayloadSpec) -> Batch:
        scales = y[self.SCALES]
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError(f"{self.SCALES}: scales must be finite and non-negative")
        out: Batch = {}
        offset = 0
        for name, t in spec.items():
            v = y[name]
            if t.dtype != "float32":
                out[name] = v
                continue
            numel = math.prod(t.shape)
            codes = self.unpack(v, name, numel)
            blocks = self._blocks(numel)
            scale = scales[:, offset : offset + blocks].unsqueeze(2)
            offset += blocks
            values = self._blocked(codes.float()) * scale
            out[name] = values.reshape(v.shape[0], -1)[:, :numel].reshape(v.shape[0], *t.shape)
        return out


class Int8(Uniform):
    """int8 codes in ``[-127, 127]`` under the tensor's own name and shape."""

    name = "int8"
    levels = 127
    SCALES = "int8.scales"

    def packed_spec(self, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("int8", shape)

    def pack(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return codes.reshape(codes.shape[0], *shape)

    def unpack(self, packed: torch.Tensor, name: str, numel: int) -> torch.Tensor:
        if bool((packed == -128).any()):
            raise CodecError(f"tensor {name!r}: int8 value -128 is outside the codec's range [-127, 127]")
        return packed.reshape(packed.shape[0], numel)


class SubByte(Uniform):
    """Codes in ``[-levels, levels]`` narrower than a byte, ``8 // bits`` per uint8:
    ``ceil(numel * bits / 8)`` bytes under the tensor's name.

    A code ``c`` travels as the field ``c + levels + 1``; element ``j * per + f`` of a tensor
    sits in field ``f`` (lowest bits first) of byte ``j``. Field 0 would be ``-levels - 1``,
    outside the range, and the unused fields of the last byte must encode zero, so every
    message has exactly one encoding and anything else is rejected.
    """

    bits: ClassVar[int]

    @property
    def _per_byte(self) -> int:
        return 8 // self.bits

    def packed_spec(self, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("uint8", (-(-math.prod(shape) // self._per_byte),))

    def pack(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        fields = (codes + self.levels + 1).to(torch.uint8)
        pad = -fields.shape[1] % self._per_byte
        fields = torch.nn.functional.pad(fields, (0, pad), value=self.levels + 1)
        fields = fields.reshape(fields.shape[0], -1, self._per_byte)
        packed = torch.zeros(fields.shape[:2], dtype=torch.uint8)
        for f in range(self._per_byte):
            packed |= fields[:, :, f] << (f * self.bits)
        return packed

    def unpack(self, packed: torch.Tensor, name: str, numel: int) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        fields = torch.stack([(packed >> (f * self.bits)) & mask for f in range(self._per_byte)], dim=2)
        fields = fields.reshape(packed.shape[0], -1)
        if bool((fields[:, :numel] == 0).any()):
            raise CodecError(f"tensor {name!r}: {self.name} code {-self.levels - 1} is outside the codec's "
                             f"range [{-self.levels}, {self.levels}]")
        if bool((fields[:, numel:] != self.levels + 1).any()):
            raise CodecError(f"tensor {name!r}: the padding of the last {self.name} byte must encode zero")
        return fields[:, :numel].to(torch.int8) - (self.levels + 1)


class Int4(SubByte):
    """4-bit codes in ``[-7, 7]``, two per byte (a code ``c`` as the nibble ``c + 8``).

    Why a 4-bit stage: a byte budget of 159 KB sent plus received per node per round (63%
    below PFedRec's 430 KB) holds one rank-16 adapter with its tracker only below about 5.5
    bits a value. On one random matching a round int4 costs 1.0% of test NDCG@10 against
    fp32 at 6.7x fewer bytes (``sim/codecs/matching-int4.toml`` against
    ``sim/codecs/matching-fp32.toml``). A ternary stage on the same packer diverged on whole
    gossiped states (docs/experiments.md, "Codecs"), so none is kept.
    """

    name = "int4"
    levels = 7
    bits = 4
    SCALES = "int4.scales"


class TopK(Stage):
    """Keep the largest-magnitude ``ceil(fraction * D)`` entries of the whole flattened payload."""

    name = "topk"
    kind = "sparsify"
    VALUES = "topk.values"
    INDICES = "topk.indices"

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    @classmethod
    def from_options(cls, options: CodecOptions) -> Stage:
        return cls(options.topk_fraction)

    @staticmethod
    def _size(spec: PayloadSpec) -> int:
        return sum(math.prod(t.shape) for t in spec.values())

    def keep(self, size: int) -> int:
        """How many entries a payload of ``size`` elements keeps: at least one, if any."""
        return min(size, max(1, math.ceil(self.fraction * size)))

    def out_spec(self, spec: PayloadSpec) -> PayloadSpec:
        if any(t.dtype != "float32" for t in spec.values()):
            raise CodecError("topk must come first in a codec pipeline: it sparsifies float32 tensors only")
        size = self._size(spec)
        if size >= 2**31:
            raise CodecError(f"topk cannot index {size} elements with int32")
        k = self.keep(size)
        return {self.VALUES: TensorSpec("float32", (k,)), self.INDICES: TensorSpec("int32", (k,))}

    def encode(self, x: Batch) -> Batch:
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in x.values()], dim=1)
        k = self.keep(flat.shape[1])
        indices = flat.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        return {self.VALUES: flat.gather(1, indices), self.INDICES: indices.to(torch.int32)}

    def decode(self, y: Batch, spec: PayloadSpec) -> Batch:
        indices = y[self.INDICES].long()
        size = self._size(spec)
        if indices.shape[1]:
            if bool((indices[:, 0] < 0).any()) or bool((indices[:, -1] >= size).any()):
                raise CodecError(f"{self.INDICES}: an index is outside [0, {size})")
            if bool((indices.diff(dim=1) <= 0).any()):
                raise CodecError(f"{self.INDICES}: indices are not strictly increasing")
        flat = torch.zeros(indices.shape[0], size).scatter_(1, indices, y[self.VALUES])
        out: Batch = {}
        offset = 0
        for name, t in spec.items():
            numel = math.prod(t.shape)
            out[name] = flat[:, offset : offset + numel].reshape(flat.shape[0], *t.shape)
            offset += numel
        return out


STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Fp16, Bf16, Int8, Int4, TopK)}
"""The registry: stage name -> class. A new codec is one :class:`Stage` and one entry here."""

NONE = "none"


class Codec:
    """A pipeline of stages; :attr:`name` is what a message's ``codec`` header field carries."""

    def __init__(self, stages: Sequence[Stage], indexed: bool = False) -> None:
        self.stages = list(stages)
        self.indexed = indexed
        self.name = "+".join(stage.name for stage in self.stages) or NONE
        self._specs: dict[tuple[tuple[str, tuple[int, ...]], ...], list[PayloadSpec]] = {}

    @property
    def passthrough(self) -> bool:
        """Whether a received payload is already the tensors, under their own names (no stage,
        no numbered names), so a receiver may mix it without decoding."""
        return not self.stages and not self.indexed

    def wire_names(self, shapes: Shapes) -> dict[str, str]:
        """Payload name -> the name it travels under (itself, or its number; module docstring)."""
        spec = self._chain(shapes)[-1]
        if not self.indexed:
            return {name: name for name in spec}
        layout = repr([(name, t.dtype, t.shape) for name, t in spec.items()]).encode()
        digest = hashlib.blake2s(layout, digest_size=4).hexdigest()
        return {name: f"{i}:{digest}" if i == 0 else str(i) for i, name in enumerate(spec)}

    def keeps_residual(self, tracking: bool = False) -> bool:
        """Whether a sender should keep an :class:`ErrorFeedback` residual with this codec.

        Top-k alone would never send the small coordinates, so a sparsifier always keeps one.
        A quantiser's error on plain gossip of states is at most half a step per message and
        does not accumulate; under gradient tracking it does: a node mixes its neighbours'
        decoded trackers but keeps its own exact one, so each round's quantisation error is
        added to the trackers' sum and never taken out, a random walk (measured on ML-100K,
        small-world: int8 lost 3.3% test NDCG@10 against float32). With the residual the errors
        telescope, and the sum stays within one message's error of the true one.
        """
        if tracking:
            return bool(self.stages)
        return any(stage.kind == "sparsify" for stage in self.stages)

    def _chain(self, shapes: Shapes) -> list[PayloadSpec]:
        """The payload spec before each stage and after the last; inputs sorted by name."""
        key = tuple(sorted((name, tuple(int(d) for d in shape)) for name, shape in shapes.items()))
        if key not in self._specs:
            chain = [{name: TensorSpec("float32", shape) for name, shape in key}]
            for stage in self.stages:
                chain.append(stage.out_spec(chain[-1]))
            self._specs[key] = chain
        return self._specs[key]

    def payload_spec(self, shapes: Shapes) -> PayloadSpec:
        """What a message from this codec carries for an adapter of these tensor shapes, under
        the names it travels under."""
        names = self.wire_names(shapes)
        return {names[name]: t for name, t in self._chain(shapes)[-1].items()}

    def wire_spec(self, shapes: Shapes, known_senders: frozenset[int] | None = None,
                  max_round: int = 2**31) -> WireSpec:
        """A :class:`WireSpec` admitting exactly this codec's payload for ``shapes``: exact
        names and shapes, only the payload's dtypes, and its exact byte count as the cap."""
        spec = self.payload_spec(shapes)
        return WireSpec(
            tensors={name: t.shape for name, t in spec.items()},
            max_bytes=max(1, sum(t.nbytes for t in spec.values())),
            allowed_dtypes=frozenset(t.dtype for t in spec.values()) or frozenset({"float32"}),
            known_senders=known_senders,
            max_round=max_round,
        )

    def encode(self, tensors: Mapping[str, np.ndarray | torch.Tensor],
               feedback: ErrorFeedback | None = None) -> dict[str, np.ndarray]:
        """One node's tensors as the wire payload (name -> array), in payload-spec order.

        With ``feedback``, the residual is added first and replaced by what this message
        leaves out.
        """
        batch = {name: torch.as_tensor(tensors[name]).detach().float().cpu().unsqueeze(0) for name in sorted(tensors)}
        payload, _ = self._encode(batch, feedback, stacked=False)
        names = self.wire_names({name: v.shape[1:] for name, v in batch.items()})
        return {names[name]: _to_numpy(v[0]) for name, v in payload.items()}

    def decode(self, payload: Mapping[str, np.ndarray], shapes: Shapes) -> dict[str, torch.Tensor]:
        """A received payload back to float32 tensors of ``shapes``; :class:`CodecError` if it
        cannot be this codec's output for them."""
        spec = self._chain(shapes)[-1]
        names = self.wire_names(shapes)
        if payload.keys() != set(names.values()):
            extra, missing = sorted(payload.keys() - names.values()), sorted(names.values() - payload.keys())
            raise CodecError(f"codec {self.name}: payload names wrong: extra {extra[:3]}, missing {missing[:3]}")
        batch: Batch = {}
        for name, t in spec.items():
            arr = payload[names[name]]
            if arr.dtype != WIRE_DTYPES[t.dtype] or arr.shape != t.shape:
                raise CodecError(f"codec {self.name}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected {t.dtype}{list(t.shape)}")
            batch[name] = _from_numpy(arr, t.dtype).unsqueeze(0)
        return {name: v[0] for name, v in self._decode(batch, shapes).items()}

    def roundtrip(self, stacked: Mapping[str, torch.Tensor],
                  feedback: ErrorFeedback | None = None) -> dict[str, torch.Tensor]:
        """What receivers decode from each of ``N`` senders' messages, for ``[N, ...]`` tensors.

        Row ``i`` equals ``decode(encode(row i))``; ``feedback`` holds stacked residuals.
        """
        batch = {name: stacked[name].detach().float() for name in sorted(stacked)}
        payload, sent = self._encode(batch, feedback, stacked=True)
        return sent if sent is not None else self._decode(payload, {name: v.shape[1:] for name, v in batch.items()})

    def _encode(self, batch: Batch, feedback: ErrorFeedback | None,
                stacked: bool) -> tuple[Batch, Batch | None]:
        """The payload of a batch, and with ``feedback`` also what it decodes to (for the residual)."""
        if feedback is not None and feedback.residual:
            if feedback.residual.keys() != batch.keys():
                raise ValueError("error-feedback residual names differ from the tensors being encoded")
            batch = {name: v + (feedback.residual[name] if stacked else feedback.residual[name].unsqueeze(0))
                     for name, v in batch.items()}
        payload = batch
        for stage in self.stages:
            payload = stage.encode(payload)
        if feedback is None:
            return payload, None
        sent = self._decode(payload, {name: v.shape[1:] for name, v in batch.items()})
        feedback.residual = {name: (v - sent[name]) if stacked else (v - sent[name])[0] for name, v in batch.items()}
        return payload, sent

    def _decode(self, payload: Batch, shapes: Shapes) -> Batch:
        chain = self._chain(shapes)
        for stage, spec in zip(reversed(self.stages), reversed(chain[:-1])):
            payload = stage.decode(payload, spec)
        if not all(bool(torch.isfinite(v).all()) for v in payload.values()):
            raise CodecError(f"codec {self.name}: decoded tensors are not finite")
        return {name: payload[name] for name in chain[0]}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A payload tensor as the array the wire carries; bfloat16 travels as its uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def _from_numpy(arr: np.ndarray, tag: str) -> torch.Tensor:
    """A received (possibly read-only, zero-copy) array as a tensor that owns its memory."""
    if tag == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr))


def parse(name: str | Sequence[str]) -> list[str]:
    """Stage names of a pipeline name (``"topk+int8"``) or list; ``"none"`` is the empty one.

    Checks names against the registry and the order rule; :class:`CodecError` otherwise.
    """
    parts = [p.strip() for p in (name.split("+") if isinstance(name, str) else name)]
    if parts == [NONE]:
        return []
    unknown = [p for p in parts if p not in STAGES]
    if unknown:
        raise CodecError(f"unknown codec {unknown[0]!r} in {name!r}; known: {NONE}, {', '.join(STAGES)} "
                         "(pipelines like topk+int8)")
    kinds = [STAGES[p].kind for p in parts]
    if kinds not in (["sparsify"], ["quantize"], ["sparsify", "quantize"]):
        raise CodecError(f"codec pipeline {name!r} must be one topk and/or one of fp16, bf16, int8, int4, topk first")
    return parts


def get_codec(name: str | Sequence[str], options: CodecOptions = CodecOptions()) -> Codec:
    """The codec for a pipeline name or list of stage names, e.g. ``get_codec("topk+int8")``."""
    return Codec([STAGES[part].from_options(options) for part in parse(name)], options.indexed)


def codec_from_config(gossip: GossipConfig) -> Codec:
    """The codec that ``gossip.codec``, ``gossip.topk_fraction``, ``gossip.quant_block`` and
    ``gossip.wire_names`` select.

    Why the name is checked here and not by :func:`p2prec.config.load`: the registry is this
    module's, and the config sits below gossip. A bad name is a :class:`~p2prec.config.ConfigError`
    naming the key, like any other bad setting; the commands call this right after loading
    the config, so a run still stops before it loads data.
    """
    try:
        return get_codec(gossip.codec, CodecOptions(gossip.topk_fraction, gossip.quant_block,
                                                    gossip.wire_names == "index"))
    except CodecError as exc:
        raise ConfigError(f"gossip.codec: {exc}") from None
