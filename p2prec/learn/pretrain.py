"""Pre-train the backbone once on public data, and cache it so a first run needs no extra step.

Two sources of public data, chosen by ``pretrain.corpus``:

- ``""``: the held-out public users of the federated data set itself (``data.public_fraction``
  of its users, disjoint from the nodes), FedPA's setting;
- a data set name (``ml-latest``, ...): every user of that corpus, another catalogue that a
  text-grounded backbone serves through item text (:func:`p2prec.model.store.load_backbone`).
  Every user of the federated data set can then be a node.

Why the federated users never take part: their data never leaves their devices. Cold items
(``data.cold_items``) are held out of pre-training too: in-domain they are already gone from
every sequence, and in a corpus every item whose title matches a cold item is removed.
The cache key covers the corpus checksum, the split, the cold titles and every model and
pre-training setting, so a cached backbone is reused only when it is exactly the one these
settings would train.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from p2prec.config import Config
from p2prec.data import load_dataset
from p2prec.data.items import title_key
from p2prec.data.movielens import default_cache_dir
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.central import train_pooled
from p2prec.learn.evaluate import build_eval_set, evaluate
from p2prec.learn.local import Params, StepSettings
from p2prec.model.backbone import SeqRecModel, build_backbone
from p2prec.model.store import load_backbone, save_backbone
from p2prec.model.text import NONE, embed_texts, encoder_identity

log = logging.getLogger(__name__)

#: Bump when pre-training code changes what a given config produces, to invalidate caches.
PRETRAIN_VERSION = 3


def pretraining_data(data: Dataset | None, cfg: Config) -> tuple[Dataset, np.ndarray, str]:
    """The data set, the users and a label (``public`` or ``all``) that pre-training uses for ``data``.

    ``data`` (the federated data set) may be None when a corpus is named and no target is
    known yet, as for ``p2prec pretrain --dataset ml-latest``: nothing is then held out.
    """
    if not cfg.pretrain.corpus:
        if data is None:
            raise ValueError("pretrain.corpus is empty: name the corpus to pre-train on")
        if len(data.public_users) == 0:
            raise ValueError("data.public_fraction is 0 and pretrain.corpus is empty: there are no public "
                             "users to pre-train on; name a corpus (pretrain.corpus = \"ml-latest\")")
        return data, data.public_users, "public"
    corpus = load_dataset(cfg.pretrain.corpus, cfg.pretrain.corpus_dir or cfg.data.dir or None, 1.0,
                          cfg.run.seed, cfg.data.min_interactions)
    cold = set() if data is None else {title_key(data.titles[i]) for i in data.cold_items}
    if cold:
        drop = np.asarray([i for i, t in enumerate(corpus.titles) if i and title_key(t) in cold], dtype=np.int64)
        corpus = replace(corpus, train=[seq[~np.isin(seq, drop)] for seq in corpus.train], cold_items=drop)
    return corpus, np.arange(corpus.n_users), "all"


def backbone_key(corpus: Dataset, cfg: Config) -> str:
    """Hash of everything that determines the pre-trained weights."""
    material = {
        "version": PRETRAIN_VERSION,
        "checksum": corpus.checksum,
        "corpus": cfg.pretrain.corpus,
        "cold": sorted(corpus.titles[i] for i in corpus.cold_items),
        "seed": cfg.run.seed,
        "data": {k: v for k, v in vars(cfg.data).items() if k not in ("dir", "users_per_node", "cold_items")}
        if not cfg.pretrain.corpus else {"min": cfg.data.min_interactions},
        "model": vars(cfg.model),
        "encoder": encoder_identity(cfg.model.text_encoder) if cfg.model.text_encoder != NONE else NONE,
        "pretrain": {k: v for k, v in vars(cfg.pretrain).items() if k != "corpus_dir"},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(corpus: Dataset, users: np.ndarray, cfg: Config,
             cache_dir: Path | None = None) -> tuple[SeqRecModel, dict]:
    """Train every backbone weight on ``users`` of ``corpus``; select the epoch by their validation NDCG@10."""
    m, p = cfg.model, cfg.pretrain
    model = fresh_backbone(corpus, cfg, cache_dir)
    sampler = NegativeSampler(corpus)
    es = build_eval_set(corpus, [np.asarray([u]) for u in users], m.max_len, cfg.eval.sampled_negatives, cfg.run.seed)

    def validate(params: Params, epoch: int) -> tuple[float, dict]:
        result = evaluate(model, params, es, protocols=("sampled",), k=cfg.eval.k)
        val = result["val"]["sampled"]
        return val["ndcg@10"], {"val_hr@10": val["hr@10"], "val_ndcg@10": val["ndcg@10"]}

    params = {n: t.detach().clone() for n, t in model.named_parameters()}
    run = train_pooled(model, params, corpus, sampler, users,
                       StepSettings(lr=p.lr, loss=p.loss, weight_decay=p.weight_decay),
                       epochs=p.epochs, batch_size=p.batch_size, max_len=m.max_len,
                       negatives=p.negatives, seed=cfg.run.seed, validate=validate,
                       eval_every=5, patience=8, desc="pretrain")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(run.best_params[name])
    model.requires_grad_(False)
    model.eval()
    info = {
        "data_checksum": corpus.checksum,
        "corpus": cfg.pretrain.corpus or cfg.data.name,
        "users": "all" if cfg.pretrain.corpus else "public",
        "pretrain_users": int(len(users)),
        "best_epoch": run.best_epoch,
        "val_ndcg@10": run.best_score,
        "key": backbone_key(corpus, cfg),
        "config": cfg.to_dict(),
    }
    return model, info


def fresh_backbone(data: Dataset, cfg: Config, cache_dir: Path | None = None) -> SeqRecModel:
    """An untrained backbone for ``data``'s catalogue, shaped by ``cfg.model``, seeded by ``run.seed``."""
    m = cfg.model
    text = None
    if m.text_encoder != NONE:
        if len(data.texts) != data.n_items + 1:
            raise ValueError(f"model.text_encoder = {m.text_encoder!r} needs item texts, but this data set "
                             "ships no item metadata; set model.text_encoder = none")
        text = torch.from_numpy(embed_texts(data.texts, m.text_encoder, cache_dir))
    return build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len, m.dropout,
                          m.causal, seed=cfg.run.seed, text=text, text_encoder=m.text_encoder,
                          id_embedding=m.id_embedding)


def save_pretrained(corpus: Dataset, users: np.ndarray, cfg: Config, out: str | Path,
                    cache_dir: Path | None = None) -> tuple[Path, dict]:
    """Pre-train on ``users`` of ``corpus`` and save the backbone with its catalogue to ``out``."""
    model, info = pretrain(corpus, users, cfg, cache_dir)
    return save_backbone(model, out, corpus.item_ids, info, corpus.titles, corpus.texts), info


def ensure_backbone(data: Dataset, cfg: Config, backbone_dir: str | Path | None = None,
                    cache_dir: Path | None = None) -> SeqRecModel:
    """The backbone serving ``data``: ``backbone_dir`` if given, else the cached one for these
    settings, pre-trained and cached first if there is none."""
    if backbone_dir:
        return load_backbone(backbone_dir, data, cache_dir)
    return load_backbone(cached_backbone(data, cfg, cache_dir), data, cache_dir)


def cached_backbone(data: Dataset, cfg: Config, cache_dir: Path | None = None) -> Path:
    """The cache folder of the backbone these settings pre-train, pre-training it first if absent."""
    corpus, users, label = pretraining_data(data, cfg)
    target = (cache_dir or default_cache_dir()) / "backbones" / backbone_key(corpus, cfg)
    if (target / "model.safetensors").is_file():
        log.info("using cached backbone %s", target)
        return target
    log.info("no cached backbone for these settings: pre-training on %d %s users of %s", len(users), label,
             cfg.pretrain.corpus or cfg.data.name)
    save_pretrained(corpus, users, cfg, target, cache_dir)
    return target
