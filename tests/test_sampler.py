"""The negative sampler never returns an interacted item; evaluation negatives are seeded."""

from __future__ import annotations

import numpy as np

from p2prec.data.sampler import NegativeSampler, seeded_rng


def test_sampler_never_returns_interacted_items(synth_data) -> None:  # noqa: ANN001
    sampler = NegativeSampler(synth_data)
    users = np.arange(synth_data.n_users)
    drawn = sampler.sample(users, (50, 4), seeded_rng(0))
    assert drawn.shape == (synth_data.n_users, 50, 4)
    for u in users:
        assert not np.isin(drawn[u], synth_data.interacted(u)).any()
        assert drawn[u].min() >= 1 and drawn[u].max() <= synth_data.n_items


def test_distinct_negatives_are_distinct_seeded_and_never_interacted(synth_data) -> None:  # noqa: ANN001
    sampler = NegativeSampler(synth_data)
    for u in range(synth_data.n_users):
        a = sampler.distinct(u, 30, seeded_rng(5, u))
        assert len(set(a.tolist())) == 30
        assert not np.isin(a, synth_data.interacted(u)).any()
        assert np.array_equal(a, sampler.distinct(u, 30, seeded_rng(5, u)))
