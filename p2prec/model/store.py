"""Saving and loading backbones: Hugging Face format plus the item catalogue.

Why a catalogue file: a backbone's item rows mean nothing without the raw item ids, titles
and texts they stand for. Loading for the same catalogue restores it exactly; loading for
another one maps items through their titles and text (:func:`load_backbone`), and an
id-only backbone that cannot be mapped fails loudly instead of recommending the wrong
films. Writes go to a temporary folder that is renamed into place, so an interrupted save
never leaves a half-written backbone behind.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from p2prec.atomic import sync_folder, write_text_atomic
from p2prec.data.items import title_key
from p2prec.data.split import Dataset
from p2prec.model.backbone import SeqRecModel
from p2prec.model.text import TextEncoderError, embed_texts

log = logging.getLogger(__name__)

VOCAB_FILE = "items.json"
INFO_FILE = "pretrain.json"


class BackboneError(ValueError):
    """A backbone directory that is missing, incomplete or built for other data."""


def save_backbone(model: SeqRecModel, out: str | Path, item_ids: np.ndarray, info: dict[str, Any] | None = None,
                  titles: list[str] | None = None, texts: list[str] | None = None) -> Path:
    """Write ``model`` (safetensors + config.json), its catalogue and run info, atomically.

    The catalogue (raw item ids, titles and texts, index 0 being padding) is what lets a
    later load serve the same items or map another catalogue's items onto these.
    """
    if any(".lora_" in name for name in model.state_dict()):
        raise BackboneError("this backbone carries LoRA adapters (peft injects them in place); "
                            "save the backbone before wrapping it")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        vocab = {"item_ids": [int(i) for i in item_ids], "titles": list(titles or []), "texts": list(texts or [])}
        write_text_atomic(tmp / VOCAB_FILE, json.dumps(vocab))
        write_text_atomic(tmp / INFO_FILE, json.dumps(info or {}, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        sync_folder(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_backbone(path: str | Path, data: Dataset | None = None, cache_dir: Path | None = None) -> SeqRecModel:
    """Load a saved backbone, frozen and in eval mode, serving ``data``'s catalogue.

    Without ``data`` (or for the catalogue it was trained on) it serves its own items. For
    another catalogue the encoder, projection and transformer are kept, an item whose title
    matches one of the backbone's exactly (:func:`p2prec.data.items.title_key`) reuses that
    id vector, and every other item is known by its text beside the mean learned id vector
    (:func:`_fill_unlearned`). Cold items of ``data`` get the mean row too: nothing was
    learned about them.
    """
    path = Path(path)
    for name in ("config.json", "model.safetensors", VOCAB_FILE):
        if not (path / name).is_file():
            raise BackboneError(f"{path}: not a p2prec backbone directory (missing {name})")
    try:
        vocab = json.loads((path / VOCAB_FILE).read_text())
        source_ids = np.asarray(vocab["item_ids"], dtype=np.int64)
        source_titles, source_texts = list(vocab.get("titles", [])), list(vocab.get("texts", []))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BackboneError(f"{path / VOCAB_FILE}: unreadable catalogue ({exc})") from None
    transformers.utils.logging.disable_progress_bar()
    try:
        model = SeqRecModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: could not load backbone ({exc})") from None
    if data is not None:
        _check_leak(path, data)
    same = data is None or np.array_equal(source_ids, data.item_ids)
    learned = np.ones(model.config.n_items + 1, dtype=bool)
    if not same:
        model, learned = _mapped(model, path, source_titles, data)
    texts = source_texts if data is None else data.texts
    if model.config.text_dim:
        if len(texts) != model.config.n_items + 1:
            raise BackboneError(f"{path}: a text-grounded backbone needs a text for every item; "
                                "this data set ships no item metadata")
        try:
            embeddings = embed_texts(texts, model.config.text_encoder, cache_dir)
        except TextEncoderError as exc:
            raise BackboneError(f"{path}: {exc}") from None
        if embeddings.shape[1] != model.config.text_dim:
            raise BackboneError(f"{path}: encoder {model.config.text_encoder!r} gives {embeddings.shape[1]}-d "
                                f"embeddings, the backbone expects {model.config.text_dim}")
        model.set_item_text(torch.from_numpy(embeddings))
    if data is not None:
        learned[data.cold_items] = False
    _fill_unlearned(model, learned)
    model.requires_grad_(False)
    return model.eval()


def _check_leak(path: Path, data: Dataset) -> None:
    """Refuse a backbone pre-trained on this very data set's federated users."""
    try:
        info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
    except (ValueError, UnicodeDecodeError):
        info = {}
    if info.get("data_checksum") == data.checksum and info.get("users") == "all" and len(data.federated_users):
        raise BackboneError(f"{path}: pre-trained on every user of this data set, so it has seen the federated "
                            "users' data; pre-train on another corpus or on the public users only")


def _mapped(model: SeqRecModel, path: Path, source_titles: list[str], data: Dataset) -> SeqRecModel:
    """``model`` re-built for ``data``'s catalogue: same transformer and projection, id rows by title."""
    config = copy.deepcopy(model.config)
    config.n_items = data.n_items
    target = SeqRecModel(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("item_emb.")}
    target.load_state_dict(state, strict=False)
    learned = np.zeros(data.n_items + 1, dtype=bool)
    if model.item_emb is not None:
        index = {title_key(t): i for i, t in reversed(list(enumerate(source_titles))) if i > 0}
        rows = torch.zeros_like(target.item_emb.weight)
        for i, title in enumerate(data.titles[1:], start=1):
            j = index.get(title_key(title))
            if j is not None:
                rows[i] = model.item_emb.weight[j]
                learned[i] = True
        with torch.no_grad():
            target.item_emb.weight.copy_(rows)
    matched = int(learned.sum())
    if not config.text_dim and not matched:
        raise BackboneError(f"{path}: backbone was built on another catalogue, has no text path and shares "
                            f"no title with this data set ({data.n_items} items)")
    log.info("backbone %s mapped onto %d items: %d by exact title, %d by text only", path, data.n_items,
             matched, data.n_items - matched)
    return target, learned


def _fill_unlearned(model: SeqRecModel, learned: np.ndarray) -> None:
    """Give every item without a learned id vector (cold, or unmatched in another catalogue) the
    mean of the learned ones.

    Why not zero: learned id vectors share a common component (every trained item was a
    positive for someone), so a zero row would rank an unlearned item below every warm one
    whatever its text says. The mean row makes it an average item, and its text decides.
    """
    learned = learned.copy()
    learned[0] = False
    unlearned = ~learned
    unlearned[0] = False
    if model.item_emb is None or not learned.any() or not unlearned.any():
        return
    with torch.no_grad():
        weight = model.item_emb.weight
        weight[torch.from_numpy(unlearned)] = weight[torch.from_numpy(learned)].mean(0)
