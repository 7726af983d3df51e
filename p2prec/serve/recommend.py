"""A user's top-k unseen items from a state folder: the Python side of ``p2prec recommend``.

Why a class that loads once: the backbone, the adapter wrapper and the data set cost
seconds to build, one user's answer milliseconds (a forward pass of the user's history and
one score per catalogue item). :meth:`Recommender.open` pays the first once and checks that
the state fits (the same data set, the same backbone); :meth:`Recommender.recommend` then
loads the user's node adapters and answers. :func:`recommend` does both for one call.

A user's history is everything they interacted with, in time order (training, validation
and test items alike: at serving time all of it is the past), and "unseen" excludes all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2prec.data.split import Dataset
from p2prec.serve.state import Manifest, StateError, fingerprint, node_params, read_manifest, unknown_user


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: the data set's own item id, its title and the model's score."""

    item: int
    title: str
    score: float


class Recommender:
    """Answers for every user a state folder serves; build it with :meth:`open`."""

    def __init__(self, manifest: Manifest, model: torch.nn.Module, data: Dataset, max_len: int) -> None:
        self.manifest = manifest
        self.model = model
        self.data = data
        self.max_len = max_len
        self.index = {int(u): i for i, u in enumerate(data.user_ids)}
        self.candidates = torch.arange(1, data.n_items + 1).unsqueeze(0)
        self._node: int | None = None

    @classmethod
    def open(cls, state: str | Path, data_dir: str | None = None, backbone_dir: str | None = None) -> Recommender:
        """Load what ``state`` needs: its config, the data set (from ``data_dir`` if given, else
        where the config says) and the backbone (``backbone_dir`` if given, else the one the state
        names). :class:`StateError` if the state is missing or damaged, or was trained on other
        data or another backbone."""
        from p2prec.config import load
        from p2prec.learn.factories import adapter_model
        from p2prec.learn.pretrain import ensure_backbone
        from p2prec.run.data import load_data
        from p2prec.serve.state import CONFIG

        manifest = read_manifest(state)
        cfg = load(manifest.root / CONFIG, [f"data.dir={data_dir}"] if data_dir else [])
        data = load_data(cfg)
        if data.checksum != manifest.data_checksum:
            raise StateError(f"{manifest.root} was trained on other data than {cfg.data.name} in "
                             f"{cfg.data.dir or 'the default folder'} (checksums differ); pass --data-dir")
        source = backbone_dir or manifest.backbone_dir
        backbone = ensure_backbone(data, cfg, source)
        found = fingerprint(backbone)
        if found != manifest.fingerprint:
            raise StateError(f"{manifest.root} was trained on backbone {manifest.fingerprint[:12]}, but "
                             f"{source or 'the cached backbone'} is {found[:12]}: they do not match")
        return cls(manifest, adapter_model(backbone, cfg), data, cfg.model.max_len)

    @property
    def users(self) -> list[int]:
        """The raw user ids this state serves."""
        return sorted(self.manifest.users)

    @torch.inference_mode()
    def recommend(self, user: int, k: int = 10) -> list[Recommendation]:
        """``user``'s ``k`` best items among those they never interacted with, best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if user not in self.manifest.users or user not in self.index:
            raise unknown_user(self.manifest, user, public=user in self.index)
        node = self.manifest.users[user][0]
        if node != self._node:
            self.model.load_trainable(node_params(self.manifest, user))
            self._node = node
        u = self.index[user]
        data = self.data
        history = np.concatenate([data.train[u], [data.val_item[u], data.test_item[u]]])[-self.max_len:]
        items = torch.zeros(1, self.max_len, dtype=torch.long)
        items[0, self.max_len - len(history):] = torch.from_numpy(history)
        scores = self.model(items, self.candidates)[0]
        scores[torch.from_numpy(data.interacted(u) - 1)] = float("-inf")
        top = scores.topk(min(k, int(torch.isfinite(scores).sum())))
        return [Recommendation(int(data.item_ids[i]), data.titles[i + 1], float(s))
                for s, i in zip(top.values.tolist(), top.indices.tolist())]


def recommend(state: str | Path, user: int, k: int = 10, data_dir: str | None = None,
              backbone_dir: str | None = None) -> list[Recommendation]:
    """``user``'s top ``k`` unseen items from the state folder ``state`` (see :class:`Recommender`)."""
    return Recommender.open(state, data_dir, backbone_dir).recommend(user, k)
