"""Pre-train the backbone on the public users, and cache it so a first run needs no extra step.

Why public users only: the federated users' data never leaves their devices, so the
foundation model may only see the held-out public set (FedPA's setting). The cache key
covers the data checksum, the split and every model and pre-training setting, so a cached
backbone is reused only when it is exactly the one these settings would train.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from p2prec.config import Config
from p2prec.data.movielens import default_cache_dir
from p2prec.data.sampler import NegativeSampler
from p2prec.data.split import Dataset
from p2prec.learn.central import train_pooled
from p2prec.learn.evaluate import build_eval_set, evaluate
from p2prec.learn.local import Params, StepSettings
from p2prec.model.backbone import SeqRecModel, build_backbone
from p2prec.model.store import load_backbone, save_backbone

log = logging.getLogger(__name__)

#: Bump when pre-training code changes what a given config produces, to invalidate caches.
PRETRAIN_VERSION = 2


def backbone_key(data: Dataset, cfg: Config) -> str:
    """Hash of everything that determines the pre-trained weights."""
    material = {
        "version": PRETRAIN_VERSION,
        "checksum": data.checksum,
        "data": {k: v for k, v in vars(cfg.data).items() if k not in ("dir", "users_per_node")},
        "model": vars(cfg.model),
        "pretrain": vars(cfg.pretrain),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(data: Dataset, cfg: Config) -> tuple[SeqRecModel, dict]:
    """Train every backbone weight on the public users; select the epoch by their validation NDCG@10."""
    if len(data.public_users) == 0:
        raise ValueError("data.public_fraction is 0: there are no public users to pre-train on")
    m, p = cfg.model, cfg.pretrain
    model = build_backbone(data.n_items, m.hidden, m.layers, m.heads, m.intermediate, m.max_len,
                           m.dropout, m.causal, seed=p.seed)
    sampler = NegativeSampler(data)
    nodes = [np.asarray([u]) for u in data.public_users]
    es = build_eval_set(data, nodes, m.max_len, cfg.eval.sampled_negatives, cfg.eval.seed)

    def validate(params: Params, epoch: int) -> tuple[float, dict]:
        result = evaluate(model, params, es, protocols=("sampled",), k=cfg.eval.k)
        val = result["val"]["sampled"]
        return val["ndcg@10"], {"val_hr@10": val["hr@10"], "val_ndcg@10": val["ndcg@10"]}

    params = {n: t.detach().clone() for n, t in model.named_parameters()}
    run = train_pooled(model, params, data, sampler, data.public_users,
                       StepSettings(lr=p.lr, loss=p.loss, weight_decay=p.weight_decay),
                       epochs=p.epochs, batch_size=p.batch_size, max_len=m.max_len,
                       negatives=p.negatives, seed=p.seed, validate=validate,
                       eval_every=5, patience=8, desc="pretrain")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(run.best_params[name])
    model.requires_grad_(False)
    model.eval()
    info = {
        "data_checksum": data.checksum,
        "public_users": int(len(data.public_users)),
        "best_epoch": run.best_epoch,
        "public_val_ndcg@10": run.best_score,
        "key": backbone_key(data, cfg),
        "config": cfg.to_dict(),
    }
    return model, info


def ensure_backbone(data: Dataset, cfg: Config, backbone_dir: str | Path | None = None,
                    cache_dir: Path | None = None) -> SeqRecModel:
    """Load ``backbone_dir`` if given; otherwise load the cached backbone or pre-train and cache one."""
    if backbone_dir:
        return load_backbone(backbone_dir, data.item_ids)
    target = (cache_dir or default_cache_dir()) / "backbones" / backbone_key(data, cfg)
    if (target / "model.safetensors").is_file():
        log.info("using cached backbone %s", target)
        return load_backbone(target, data.item_ids)
    log.info("no cached backbone for these settings: pre-training on %d public users", len(data.public_users))
    model, info = pretrain(data, cfg)
    save_backbone(model, target, data.item_ids, info)
    return load_backbone(target, data.item_ids)
