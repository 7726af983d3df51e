"""Crash-safe checkpoints of a node's learned state: one safetensors file, replaced atomically.

Why this shape: a node may be killed at any instant, and what it learned must survive.
The file goes through the package's one atomic write (:func:`p2prec.atomic.write_bytes_atomic`:
temporary file, fsync, rename, fsync of the folder), so a reader sees the previous complete
checkpoint or the new complete one, never a mixture. Tensors and a small JSON header
travel in the one file (safetensors ``__metadata__``), so they cannot drift apart, and
nothing is pickled: loading runs no code.

Why below the node: the simulator saves its nodes' states in this same format for serving,
and serving reads both, so the format belongs to neither the real node nor the simulator.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from p2prec.atomic import write_bytes_atomic

FORMAT = "p2prec-node-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.safetensors"
PARAM = "param/"
"""Name prefix of a node's trainable parameters (adapters, gate) among a checkpoint's tensors."""
OPT = "opt/"
"""Name prefix of a node's optimizer state among a checkpoint's tensors."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or belongs to another node; the message names the file."""


@dataclass
class Checkpoint:
    """A node's state after round ``round`` completed.

    ``tensors`` holds the trainable parameters (personal and shared adapters, gate), the
    optimizer state and the RNG state, under names the node chooses; ``info`` holds small
    JSON-able counters (bytes sent, wall time) that metrics continue from after a restart.
    """

    node: int
    round: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically and durably, so a crash keeps the previous checkpoint whole."""
    tensors = {name: t.detach().contiguous() for name, t in ckpt.tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "node": ckpt.node, "round": ckpt.round, "info": ckpt.info,
              "sha256": digest(tensors)}
    # 0600: the personal adapter is learned from the user's own ratings, so it stays the owner's
    write_bytes_atomic(path, save_bytes(tensors, metadata={"p2prec": json.dumps(header, sort_keys=True)}), 0o600)


def _header(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON header stored in the safetensors metadata, checked for format and version."""
    if len(data) < 8:
        raise CheckpointError(f"checkpoint {path} is unreadable: {len(data)} bytes, too short")
    size = int.from_bytes(data[:8], "little")
    try:
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        header = json.loads(meta["p2prec"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: no p2prec header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a p2prec node checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {header.get('version')!r}, expected {VERSION}")
    for key in ("node", "round"):
        if type(header.get(key)) is not int or header[key] < 0:
            raise CheckpointError(f"checkpoint {path} is unreadable: bad {key} {header.get(key)!r}")
    return header


def load(path: Path, node: int | None = None) -> Checkpoint:
    """Read the checkpoint at ``path``; :class:`CheckpointError` if it is unreadable or not ``node``'s."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc.strerror or exc}") from None
    header = _header(data, path)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {' '.join(str(exc).split())}") from None
    if digest(tensors) != header.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its tensors do not match their checksum")
    if node is not None and header["node"] != node:
        raise CheckpointError(f"checkpoint {path} belongs to node {header['node']}, not node {node}")
    return Checkpoint(header["node"], header["round"], tensors, dict(header.get("info") or {}))
