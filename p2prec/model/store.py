"""Saving and loading backbones: Hugging Face format plus the item vocabulary.

Why a vocabulary file: a backbone's item rows mean nothing without the raw item ids they
stand for; a node that loads a backbone built on another catalogue must fail loudly
instead of recommending the wrong films. Writes go to a temporary folder that is renamed
into place, so an interrupted save never leaves a half-written backbone behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import transformers

from p2prec.model.backbone import SeqRecModel

VOCAB_FILE = "items.json"
INFO_FILE = "pretrain.json"


class BackboneError(ValueError):
    """A backbone directory that is missing, incomplete or built for other data."""


def save_backbone(model: SeqRecModel, out: str | Path, item_ids: np.ndarray,
                  info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (safetensors + config.json), the vocabulary and run info, atomically."""
    if any(".lora_" in name for name in model.state_dict()):
        raise BackboneError("this backbone carries LoRA adapters (peft injects them in place); "
                            "save the backbone before wrapping it")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / VOCAB_FILE).write_text(json.dumps({"item_ids": [int(i) for i in item_ids]}))
        (tmp / INFO_FILE).write_text(json.dumps(info or {}, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_backbone(path: str | Path, item_ids: np.ndarray | None = None) -> SeqRecModel:
    """Load a saved backbone, frozen and in eval mode; check its vocabulary against ``item_ids``."""
    path = Path(path)
    for name in ("config.json", "model.safetensors", VOCAB_FILE):
        if not (path / name).is_file():
            raise BackboneError(f"{path}: not a p2prec backbone directory (missing {name})")
    try:
        vocab = np.asarray(json.loads((path / VOCAB_FILE).read_text())["item_ids"], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise BackboneError(f"{path / VOCAB_FILE}: unreadable vocabulary ({exc})") from None
    if item_ids is not None and not np.array_equal(vocab, np.asarray(item_ids)):
        raise BackboneError(f"{path}: backbone vocabulary ({len(vocab)} items) does not match "
                            f"the data set ({len(item_ids)} items); pre-train on this data")
    transformers.utils.logging.disable_progress_bar()
    try:
        model = SeqRecModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: could not load backbone ({exc})") from None
    model.requires_grad_(False)
    return model.eval()

