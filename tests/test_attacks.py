"""Byzantine attacks: seeded choice of attackers, each kind's effect, honest rows untouched."""

from __future__ import annotations

import pytest
import torch

from p2prec.config import ConfigError, SimConfig, load
from p2prec.gossip.robust import get_rule, robust_mix
from p2prec.sim.attacks import ATTACKS, byzantine_count, choose_byzantine, inject
from p2prec.topology import build, metropolis_hastings


def sent(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b": torch.randn(n, 3, generator=g), "a": torch.randn(n, 2, 2, generator=g)}


def test_byzantine_count_reads_counts_and_fractions() -> None:
    assert byzantine_count(0, 100) == 0
    assert byzantine_count(3, 100) == 3
    assert byzantine_count(0.1, 754) == 75
    with pytest.raises(ValueError, match="whole"):
        byzantine_count(2.5, 100)
    with pytest.raises(ValueError, match="among only"):
        byzantine_count(11, 10)


def test_choice_is_seeded_and_has_the_right_size() -> None:
    a, b, c = choose_byzantine(50, 7, seed=1), choose_byzantine(50, 7, seed=1), choose_byzantine(50, 7, seed=2)
    assert a.dtype == torch.bool and int(a.sum()) == 7
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(choose_byzantine(5, 5, 0).sum()) == 5 and int(choose_byzantine(5, 0, 0).sum()) == 0


@pytest.mark.parametrize("kind", ATTACKS)
def test_each_attack_changes_only_byzantine_rows_and_never_its_input(kind: str) -> None:
    x = sent()
    before = {k: v.clone() for k, v in x.items()}
    bad = choose_byzantine(10, 3, seed=4)
    out = inject(kind, x, bad, 5.0, torch.Generator().manual_seed(0))
    for k in x:
        assert torch.equal(x[k], before[k])
        assert torch.equal(out[k][~bad], x[k][~bad])
        rows = out[k][bad]
        if kind == "none":
            assert torch.equal(rows, x[k][bad])
        elif kind == "sign-flip":
            assert torch.equal(rows, -5.0 * x[k][bad])
        elif kind == "constant":
            assert bool((rows == 5.0).all())
        else:
            assert not torch.equal(rows, x[k][bad])


def test_noise_attack_has_the_requested_size_and_is_seeded() -> None:
    x = {"w": torch.zeros(100, 500)}
    bad = choose_byzantine(100, 40, seed=0)
    out = inject("noise", x, bad, 3.0, torch.Generator().manual_seed(9))
    assert float(out["w"][bad].std()) == pytest.approx(3.0, rel=0.02)
    again = inject("noise", x, bad, 3.0, torch.Generator().manual_seed(9))
    assert torch.equal(out["w"], again["w"])


def test_unknown_kind_and_wrong_mask_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        inject("krum", sent(), torch.zeros(10, dtype=torch.bool), 1.0, torch.Generator())
    with pytest.raises(ValueError, match="rows"):
        inject("sign-flip", sent(), torch.ones(4, dtype=torch.bool), 1.0, torch.Generator())


def test_median_contains_a_sign_flip_that_wrecks_plain_mixing() -> None:
    w = metropolis_hastings(build("random-regular:d=8", 40, seed=0))  # 4 attackers: honest majorities
    honest = torch.ones(40, 8) + 0.01 * torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    bad = choose_byzantine(40, 4, seed=3)
    received = inject("sign-flip", {"x": honest}, bad, 50.0, torch.Generator())["x"]
    good = ~bad
    mean_error = (robust_mix(get_rule("mean"), w, received)[good] - 1).abs().max()
    median_error = (robust_mix(get_rule("median"), w, received)[good] - 1).abs().max()
    assert mean_error > 5 and median_error < 0.5


def test_config_attack_kinds_match_and_fractional_counts_are_refused() -> None:
    assert SimConfig.__dataclass_fields__["attack"].metadata["choices"] == ATTACKS
    assert load(None, ["sim.byzantine=0.1", "sim.attack=noise"]).sim.attack == "noise"
    with pytest.raises(ConfigError, match="sim.byzantine"):
        load(None, ["sim.byzantine=2.5"])
    with pytest.raises(ConfigError, match="sim.attack"):
        load(None, ["sim.attack=krum"])
