"""Negative samplers: training never sees a training item; evaluation never sees any rated item."""

from __future__ import annotations

import numpy as np

from p2prec.data.sampler import NegativeSampler
from p2prec.rng import seeded_rng


def test_training_sampler_never_returns_a_training_item(synth_data) -> None:  # noqa: ANN001
    sampler = NegativeSampler(synth_data)
    users = np.arange(synth_data.n_users)
    drawn = sampler.sample(users, (200, 4), seeded_rng(0))
    assert drawn.shape == (synth_data.n_users, 200, 4)
    held_out_seen = 0
    for u in users:
        assert not np.isin(drawn[u], synth_data.train[u]).any()
        assert drawn[u].min() >= 1 and drawn[u].max() <= synth_data.n_items
        held_out_seen += int(np.isin([synth_data.val_item[u], synth_data.test_item[u]], drawn[u]).any())
    assert held_out_seen > 0, "held-out items must be drawable as training negatives (no leak)"


def test_evaluation_sampler_never_returns_any_rated_item(synth_data) -> None:  # noqa: ANN001
    sampler = NegativeSampler(synth_data, held_out=True)
    drawn = sampler.sample(np.arange(synth_data.n_users), (200,), seeded_rng(1))
    for u in range(synth_data.n_users):
        assert not np.isin(drawn[u], synth_data.interacted(u)).any()


def test_distinct_negatives_are_distinct_seeded_and_never_rated(synth_data) -> None:  # noqa: ANN001
    sampler = NegativeSampler(synth_data, held_out=True)
    for u in range(synth_data.n_users):
        a = sampler.distinct(u, 30, seeded_rng(5, u))
        assert len(set(a.tolist())) == 30
        assert not np.isin(a, synth_data.interacted(u)).any()
        assert np.array_equal(a, sampler.distinct(u, 30, seeded_rng(5, u)))
