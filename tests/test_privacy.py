"""Local DP: clipping, the noise's size, and epsilon from the dp-accounting library."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from p2prec.config import load
from p2prec.gossip.privacy import (clip_update, epsilon, noise_for_epsilon, noise_multiplier, privatize, snr_bound,
                                   update_norms)


def update(seed: int = 0, n: int | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    return {"a": scale * torch.randn(*lead, 8, 64, generator=g), "b": scale * torch.randn(*lead, 300, generator=g)}


def test_clipping_bounds_the_norm_over_all_tensors_and_keeps_short_updates() -> None:
    long, short = update(scale=1.0), update(scale=1e-3)
    assert float(update_norms(long)) > 5
    clipped = clip_update(long, 2.0)
    assert float(update_norms(clipped)) == pytest.approx(2.0, rel=1e-5)
    for k in long:  # direction kept
        assert torch.allclose(clipped[k] * float(update_norms(long)) / 2.0, long[k], atol=1e-4)
    kept = clip_update(short, 2.0)
    assert all(torch.equal(kept[k], short[k]) for k in short)
    zero = clip_update({"z": torch.zeros(3)}, 1.0)
    assert torch.equal(zero["z"], torch.zeros(3))


def test_stacked_clipping_is_per_row_and_equals_each_node_alone() -> None:
    rows = [update(i, scale=s) for i, s in enumerate((1.0, 1e-3, 5.0))]
    stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    together = clip_update(stacked, 1.5, stacked=True)
    norms = update_norms(together, stacked=True)
    assert norms.shape == (3,)
    assert norms.tolist() == pytest.approx([1.5, float(update_norms(rows[1])), 1.5], rel=1e-5)
    for i, row in enumerate(rows):
        alone = clip_update(row, 1.5)
        assert all(torch.allclose(together[k][i], alone[k], rtol=1e-6, atol=0) for k in row)


def test_noise_has_std_sigma_times_clip_and_is_seeded() -> None:
    zero = {"a": torch.zeros(200, 100), "b": torch.zeros(5000)}
    noisy = privatize(zero, clip=0.5, noise_multiplier=1.2, generator=torch.Generator().manual_seed(1))
    values = torch.cat([v.reshape(-1) for v in noisy.values()])
    # 25,000 draws: the sample std is within 2% of 0.6 with overwhelming probability.
    assert float(values.std()) == pytest.approx(0.6, rel=0.02)
    assert abs(float(values.mean())) < 0.02
    again = privatize(dict(reversed(zero.items())), 0.5, 1.2, torch.Generator().manual_seed(1))
    assert all(torch.equal(noisy[k], again[k]) for k in zero)


def test_privatize_without_noise_is_clipping_and_stacked_noise_is_per_row() -> None:
    x = update(3, n=4)
    g = torch.Generator().manual_seed(0)
    same = privatize(x, 1.0, 0.0, g, stacked=True)
    clipped = clip_update(x, 1.0, stacked=True)
    assert all(torch.equal(same[k], clipped[k]) for k in x)
    noise = privatize({k: torch.zeros_like(v) for k, v in x.items()}, 1.0, 1.0, g, stacked=True)
    assert noise["a"].shape == (4, 8, 64)
    assert not torch.equal(noise["a"][0], noise["a"][1])


def test_epsilon_matches_the_library_and_is_monotone() -> None:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.1), 50))
    assert epsilon(1.1, 50, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    by_rounds = [epsilon(1.0, r, 1e-5) for r in (1, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [epsilon(s, 100, 1e-5) for s in (0.5, 1.0, 2.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert epsilon(1.0, 100, 1e-3) < epsilon(1.0, 100, 1e-6)
    assert epsilon(0.0, 10, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(1.0, 100, 1e-5, sample_rate=0.1) < epsilon(1.0, 100, 1e-5)


@pytest.mark.parametrize("target, rounds", [(1.0, 100), (8.0, 100), (3.0, 10)])
def test_noise_for_epsilon_inverts_epsilon(target: float, rounds: int) -> None:
    sigma = noise_for_epsilon(target, rounds, 1e-5)
    assert epsilon(sigma, rounds, 1e-5) <= target * (1 + 1e-9)
    assert epsilon(sigma * 0.99, rounds, 1e-5) > target  # the smallest such noise, within 1%


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="clip"):
        clip_update(update(), 0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 10, 0.0)
    with pytest.raises(ValueError, match="target epsilon"):
        noise_for_epsilon(0.0, 10, 1e-5)


def test_config_target_epsilon_sets_the_noise() -> None:
    cfg = load(None, ["privacy.enabled=true", "privacy.noise_multiplier=0.7"])
    assert noise_multiplier(cfg.privacy, 100) == 0.7
    cfg = load(None, ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.delta=1e-5"])
    assert noise_multiplier(cfg.privacy, 100) == pytest.approx(noise_for_epsilon(8.0, 100, 1e-5))


def test_the_snr_bound_is_what_summing_identical_clipped_updates_gives() -> None:
    """The bound's best case, built literally: every node releases the same update of norm C
    every round; the norm of the summed signal over the norm of the summed noise matches."""
    rounds, nodes, dim, sigma, clip = 20, 30, 500, 2.0, 0.1
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(dim, generator=g)
    signal = rounds * nodes * clip * direction / direction.norm()
    noise = sigma * clip * torch.randn(rounds * nodes, dim, generator=g).sum(dim=0)
    measured = float(signal.norm() / noise.norm())
    assert measured == pytest.approx(snr_bound(sigma, rounds, nodes, dim), rel=0.1)
    assert snr_bound(0.0, rounds, nodes, dim) == math.inf
