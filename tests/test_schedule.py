"""Learning-rate schedules: the cosine factor's shape, and errors that name the key."""

from __future__ import annotations

import math

import pytest

from p2prec.learn.local import StepSettings
from p2prec.learn.schedule import lr_factor, scaled


def test_constant_is_one_every_round() -> None:
    assert {lr_factor("constant", r, 50) for r in range(1, 51)} == {1.0}


def test_cosine_starts_at_one_falls_monotonically_and_keeps_a_last_step() -> None:
    factors = [lr_factor("cosine", r, 200) for r in range(1, 201)]
    assert factors[0] == 1.0
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 200)))
    assert 0.0 < factors[-1] < 1e-3


def test_rounds_past_the_horizon_take_the_last_factor() -> None:
    assert lr_factor("cosine", 250, 200) == lr_factor("cosine", 200, 200)


def test_unknown_schedule_names_the_key() -> None:
    for rounds in (10, 0):
        with pytest.raises(ValueError, match="train.lr_schedule"):
            lr_factor("linear", 1, rounds)


def test_scaled_multiplies_both_rates_and_nothing_else() -> None:
    s = StepSettings(lr=1e-3, shared_lr=2e-3, loss="ce")
    half = scaled(s, 0.5)
    assert (half.lr, half.shared_lr, half.loss) == (5e-4, 1e-3, "ce")
    assert scaled(s, 1.0) is s
