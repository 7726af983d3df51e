"""Item text embeddings from a pre-trained language model, computed once and cached.

``model.text_encoder`` names the encoder:

- ``wordllama`` (the default): WordLlama's 256-d token embeddings, distilled from a Llama
  model, which its pip wheel ships together with its tokenizer. Why it needs care:
  ``WordLlama.load()`` (0.4.0) looks for the bundled tokenizer in a folder the wheel does
  not have and then downloads it. :func:`_wordllama` gives it a cache folder whose
  ``tokenizers/`` holds the file the wheel ships and forbids downloads, so it never opens
  a connection.
- a path to a local Hugging Face encoder folder: its token states, mean-pooled over the
  attention mask. Loaded with ``local_files_only``, so it never downloads either.
- ``none``: no text; the backbone knows items by id only.

Embeddings are L2-normalised rows, one per text, cached under ``<cache>/text/`` keyed by
the encoder's identity and the exact texts, so a catalogue is encoded once per encoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from p2prec.atomic import write_bytes_atomic
from p2prec.data.movielens import default_cache_dir

NONE = "none"
WORDLLAMA = "wordllama"
_BATCH = 64


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded or run offline."""


def encoder_identity(spec: str) -> str:
    """What determines an encoder's output: its name and version, or a hash of a folder's files."""
    if spec == WORDLLAMA:
        try:
            from importlib.metadata import version

            return f"wordllama-{version('wordllama')}-l2_supercat-256"
        except Exception as exc:  # noqa: BLE001 - any metadata failure means it is not installed
            raise TextEncoderError(f"model.text_encoder = wordllama: the wordllama package is missing ({exc})") from None
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"model.text_encoder: {spec!r} is neither 'wordllama', 'none' nor a folder "
                               "holding a Hugging Face encoder (config.json)")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"hf-{digest.hexdigest()[:16]}"


def encoder_parameters(spec: str) -> int:
    """How many parameters the encoder ``spec`` holds (0 for ``none``), read from its weight files'
    headers: the size of the language model behind the item texts, for reports."""
    if spec == NONE:
        return 0
    from safetensors import safe_open

    if spec == WORDLLAMA:
        import wordllama

        files = sorted((Path(wordllama.__file__).parent / "weights").glob("*_256.safetensors"))
    else:
        files = sorted(Path(spec).glob("*.safetensors"))
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as fh:
            total += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    return total


def embed_texts(texts: list[str], spec: str, cache_dir: Path | None = None) -> np.ndarray:
    """L2-normalised embeddings ``[len(texts), dim]`` (float32) of ``texts`` under encoder ``spec``."""
    if spec == NONE:
        raise TextEncoderError("model.text_encoder is 'none': there are no text embeddings")
    identity = encoder_identity(spec)
    key = hashlib.sha256(json.dumps([identity, texts]).encode()).hexdigest()[:24]
    path = (cache_dir or default_cache_dir()) / "text" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    raw = _wordllama(cache_dir)(texts) if spec == WORDLLAMA else _hugging_face(Path(spec))(texts)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    out = (raw / np.maximum(norms, 1e-12)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, _npy_bytes(out))
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _wordllama(cache_dir: Path | None):  # noqa: ANN202 - returns a texts -> array function
    """WordLlama loaded from the wheel alone: weights from the package, tokenizer via a local cache."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as exc:
        raise TextEncoderError(f"model.text_encoder = wordllama: cannot import wordllama ({exc})") from None
    shipped = Path(wordllama.__file__).parent / "tokenizers"
    local = (cache_dir or default_cache_dir()) / "wordllama"
    (local / "tokenizers").mkdir(parents=True, exist_ok=True)
    for config in shipped.glob("*.json"):
        target = local / "tokenizers" / config.name
        if not target.is_file():
            shutil.copyfile(config, target)
    try:
        model = WordLlama.load(cache_dir=local, disable_download=True)
    except (FileNotFoundError, ValueError) as exc:
        raise TextEncoderError(f"model.text_encoder = wordllama: cannot load it offline ({exc})") from None
    return lambda texts: np.asarray(model.embed(texts, norm=False), dtype=np.float32)


def _hugging_face(folder: Path):  # noqa: ANN202 - returns a texts -> array function
    """A local Hugging Face encoder, mean-pooled over each text's real tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"model.text_encoder: cannot load {folder} ({exc})") from None

    def run(texts: list[str]) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), _BATCH):
                batch = tokenizer(texts[start:start + _BATCH], padding=True, truncation=True, return_tensors="pt")
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                rows.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1.0)).numpy())
        return np.concatenate(rows).astype(np.float32)

    return run
