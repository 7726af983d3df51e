"""What a served model is made of, on disk: the layout of a state folder, written and read here.

A state folder holds everything :mod:`p2prec.serve.recommend` needs besides the data set and
the backbone it names. A real node's folder (``node.dir/node-<id>/``) is one; a simulator
run made with ``p2prec-sim --save-states`` writes one under ``OUT/state/``::

    serving.json                        the manifest (below); written last
    config.toml                         the fully resolved config the adapters were trained under
    node-<i>/checkpoint.safetensors     node i's adapters (simulator; one folder per node)
    checkpoint.safetensors              the node's own checkpoint (real node)

``serving.json``::

    {"format": "p2prec-serving", "version": 1,
     "round": int | null,               # the round the checkpoints hold; null for a live node
     "data_checksum": str,              # the data set the adapters were trained on
     "backbone": {"dir": str | null,    # the backbone folder given to the run; null: the cached one
                  "fingerprint": str},  # SHA-256 of the backbone's weights (see :func:`fingerprint`)
     "users": {"<raw user id>": {"node": int, "checkpoint": "<path relative to the folder>"}}}

A checkpoint is :mod:`p2prec.run.checkpoint`'s file, whose tensors ``param/<name>`` hold the
node's personal adapter, shared adapter and gate ``[1, ...]`` (a real node's also holds its
optimizer state, which serving ignores). Why the real node's format for the simulator too:
one reader serves both, and a simulated node's state is exactly what a real node would hold.

Every file is written atomically (:func:`p2prec.atomic.write_text_atomic`,
:func:`p2prec.run.checkpoint.save`) and the manifest comes last, so a reader sees either the
previous complete manifest or the new one. A simulator's checkpoints carry the manifest's
round, so a folder half rewritten by a second run is reported as damaged, not served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2prec.atomic import write_text_atomic
from p2prec.config import Config
from p2prec.data.split import Dataset
from p2prec.run import checkpoint
from p2prec.run.checkpoint import PARAM

FORMAT = "p2prec-serving"
VERSION = 1
MANIFEST = "serving.json"
CONFIG = "config.toml"
SIM_FOLDER = "state"
"""Where ``p2prec-sim --save-states`` puts the state folder inside its results folder."""


class StateError(ValueError):
    """A state folder that is missing, damaged, or does not fit what it is used with; one line."""


@dataclass(frozen=True)
class Manifest:
    """A state folder's ``serving.json``, checked; ``users`` maps a raw user id to (node, checkpoint path)."""

    root: Path
    round: int | None
    data_checksum: str
    backbone_dir: str | None
    fingerprint: str
    users: dict[int, tuple[int, Path]]


def fingerprint(backbone: torch.nn.Module) -> str:
    """SHA-256 of a backbone's weights, taken before adapters are added to it.

    Why the weights and not the folder: a backbone can be moved, copied or re-cached, and
    adapters trained on one backbone are meaningless on any other, whatever its path.
    """
    return checkpoint.digest(backbone.state_dict())


def write_manifest(root: Path, cfg: Config, data: Dataset, backbone_dir: str | Path | None, backbone_sha: str,
                   users: dict[int, tuple[int, str]], round_: int | None) -> Path:
    """Write ``config.toml`` and then ``serving.json`` into ``root``; ``users`` maps raw user ids to
    (node, checkpoint path relative to ``root``), ``backbone_sha`` is the backbone's :func:`fingerprint`."""
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / CONFIG, cfg.to_toml())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "round": round_,
        "data_checksum": data.checksum,
        "backbone": {"dir": str(Path(backbone_dir).resolve()) if backbone_dir else None, "fingerprint": backbone_sha},
        "users": {str(u): {"node": node, "checkpoint": path} for u, (node, path) in sorted(users.items())},
    }
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return root


def save_states(root: Path, cfg: Config, data: Dataset, params: dict[str, torch.Tensor],
                nodes: list[np.ndarray], round_: int, backbone_dir: str | Path | None, backbone_sha: str) -> Path:
    """Write a simulator's stacked node parameters ``[N, ...]`` as a state folder at ``root``:
    one node checkpoint each, then the manifest."""
    users: dict[int, tuple[int, str]] = {}
    for i, members in enumerate(nodes):
        rel = f"node-{i}/{checkpoint.FILE_NAME}"
        tensors = {PARAM + k: v[i:i + 1] for k, v in params.items()}
        checkpoint.save(root / rel, checkpoint.Checkpoint(i, round_, tensors))
        users.update({int(data.user_ids[u]): (i, rel) for u in members})
    return write_manifest(root, cfg, data, backbone_dir, backbone_sha, users, round_)


def state_root(folder: str | Path) -> Path:
    """The state folder ``folder`` names: itself, or the ``state/`` of a simulator's results folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StateError(f"{folder}: no such state folder")
    for root in (folder, folder / SIM_FOLDER):
        if (root / MANIFEST).is_file():
            return root
    raise StateError(f"{folder}: not a p2prec state folder (no {MANIFEST}); save one with "
                     f"'p2prec-sim --save-states' or point at a node's state folder")


def read_manifest(folder: str | Path) -> Manifest:
    """The checked manifest of the state folder ``folder`` (see :func:`state_root`)."""
    root = state_root(folder)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION}")
        backbone = raw["backbone"]
        users = {int(u): (_int(e["node"]), root / str(e["checkpoint"])) for u, e in raw["users"].items()}
        round_ = raw["round"] if raw["round"] is None else _int(raw["round"])
        manifest = Manifest(root, round_, str(raw["data_checksum"]), backbone["dir"], str(backbone["fingerprint"]),
                            users)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise StateError(f"{path} is damaged: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    if not (root / CONFIG).is_file():
        raise StateError(f"{root}: damaged state folder, {CONFIG} is missing")
    return manifest


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def unknown_user(manifest: Manifest, user: int, public: bool = False) -> StateError:
    """The error for a user id the state folder does not serve, naming the range it does;
    ``public``: the data set has this user, but no node serves it (a public user)."""
    known = sorted(manifest.users)
    shown = f"ids {known[0]}..{known[-1]}" if known else "none"
    why = "; it is one of the data set's public users, which are not nodes" if public else ""
    return StateError(f"user {user} is not served by {manifest.root} ({len(known)} users, {shown}){why}")


def node_params(manifest: Manifest, user: int) -> dict[str, torch.Tensor]:
    """The trainable tensors of the node serving raw user id ``user``, by parameter name, without
    the node dimension; :class:`StateError` for an unknown user or a damaged checkpoint."""
    if user not in manifest.users:
        raise unknown_user(manifest, user)
    node, path = manifest.users[user]
    try:
        ckpt = checkpoint.load(path, node)
    except checkpoint.CheckpointError as exc:
        raise StateError(str(exc)) from None
    if manifest.round is not None and ckpt.round != manifest.round:
        raise StateError(f"{path} holds round {ckpt.round} but {manifest.root / MANIFEST} says round "
                         f"{manifest.round}: the state folder is damaged (half rewritten?)")
    params = {k[len(PARAM):]: v for k, v in ckpt.tensors.items() if k.startswith(PARAM)}
    if any(v.shape[:1] != (1,) for v in params.values()):
        raise StateError(f"{path} is not a single node's checkpoint")
    return {k: v[0] for k, v in params.items()}
