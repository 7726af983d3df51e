"""Robust rules: known values, resistance to a scaled sign-flip, stacked = per node = plain mixing."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from p2prec.config import RobustConfig
from p2prec.gossip.mixing import drop_messages, mix, row_normalise
from p2prec.gossip.robust import (
    RULES,
    Neighbourhood,
    NormBound,
    bound_mixing,
    clipped_gossip,
    coordinate_median,
    sort_few,
    get_rule,
    robust_mix,
    state_norms,
    trimmed_mean,
    weighted_mean,
    within_norm_bound,
)
from p2prec.topology import build, metropolis_hastings


def one(own: list[float], received: list[list[float]], weights: list[float] | None = None) -> Neighbourhood:
    return Neighbourhood.for_node(torch.tensor(own), [torch.tensor(r) for r in received], weights)


def test_rules_on_known_values() -> None:
    hood = one([0.0, 10.0], [[1.0, 20.0], [2.0, 30.0], [100.0, -50.0]])
    assert coordinate_median(hood).tolist() == [[1.5, 15.0]]
    assert weighted_mean(hood).tolist() == [[103 / 4, 10 / 4]]
    assert trimmed_mean(hood, 0.25).tolist() == [[1.5, 15.0]]  # one cut at each end of 4 values
    assert trimmed_mean(hood, 0.0).tolist() == weighted_mean(hood).tolist()
    odd = one([0.0], [[1.0], [7.0], [3.0], [-9.0]])
    assert coordinate_median(odd).tolist() == [[1.0]]
    assert trimmed_mean(odd, 0.2).item() == pytest.approx(4 / 3)  # floor(0.2 * 5) = 1 cut at each end


def test_weights_are_renormalised_and_clipping_bounds_each_pull() -> None:
    hood = one([0.0, 0.0], [[3.0, 4.0], [0.0, 1.0]], weights=[1.0, 2.0])
    assert torch.allclose(weighted_mean(hood), torch.tensor([[3 / 4, 6 / 4]]))
    # the first neighbour is 5 away and clipped to 1, the second is 1 away and kept
    assert torch.allclose(clipped_gossip(hood, 1.0), torch.tensor([[0.6 / 4, 0.8 / 4 + 2 / 4]]))
    assert torch.allclose(clipped_gossip(hood, 1e9), weighted_mean(hood))


def test_the_adaptive_radius_is_tau_times_the_median_distance_of_the_neighbours_heard() -> None:
    hood = one([0.0, 0.0], [[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
    # distances 5, 1 and 2: the radius is 2, so only the first is clipped, to (1.2, 1.6)
    assert torch.allclose(clipped_gossip(hood, 1.0, adaptive=True), torch.tensor([[1.2 / 4, 4.6 / 4]]))
    assert torch.allclose(clipped_gossip(hood, 2.5, adaptive=True), weighted_mean(hood))
    stacked = Neighbourhood(hood.own.repeat(2, 1), hood.received.repeat(2, 1, 1),
                            torch.tensor([[True, True, True], [False, True, False]]), torch.ones(2, 3), torch.ones(2))
    # the second node heard only the neighbour 1 away: its radius is 1 and it mixes as mean
    assert torch.allclose(clipped_gossip(stacked, 1.0, adaptive=True)[1], torch.tensor([0.0, 0.5]))


def test_a_node_that_heard_nothing_keeps_its_state_under_every_rule() -> None:
    hood = Neighbourhood.for_node(torch.tensor([1.0, -2.0]), [])
    for name in RULES:
        assert get_rule(name)(hood).tolist() == [[1.0, -2.0]], name


def test_median_and_trimmed_mean_resist_a_scaled_sign_flip_while_mean_does_not() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(50, generator=g)
    honest = [truth + 0.01 * torch.randn(50, generator=g) for _ in range(5)]
    attacker = -100.0 * truth
    hood = Neighbourhood.for_node(honest[0], [*honest[1:], attacker])
    error = {name: float((get_rule(name, trim=0.2, tau=0.1)(hood)[0] - truth).norm()) for name in RULES}
    assert error["mean"] > 10 * truth.norm()
    for name in ("median", "trimmed-mean", "clipped", "clipped-adaptive"):
        assert error[name] < 0.1 * float(truth.norm()), (name, error)


def test_masked_slots_are_ignored_whatever_they_hold() -> None:
    own, received = torch.randn(3, 4), torch.randn(3, 2, 4)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    poisoned = received.clone()
    poisoned[~mask] = 1e30
    for name in RULES:
        rule = get_rule(name)
        a = rule(Neighbourhood(own, received, mask, torch.ones(3, 2), torch.ones(3)))
        b = rule(Neighbourhood(own, poisoned, mask, torch.ones(3, 2), torch.ones(3)))
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", RULES)
def test_stacked_robust_mix_equals_each_node_alone(name: str) -> None:
    w = drop_messages(metropolis_hastings(build("small-world", 30, seed=2)), 0.3, np.random.default_rng(1))
    flat = torch.randn(30, 40, generator=torch.Generator().manual_seed(3))
    rule = get_rule(name, trim=0.2, tau=0.5)
    together = robust_mix(rule, w, flat)
    w = sp.csr_matrix(w)
    for i in range(30):
        row = w.getrow(i)
        senders = [j for j in row.indices if j != i]
        alone = rule(Neighbourhood.for_node(flat[i], [flat[j] for j in senders],
                                            [row[0, j] for j in senders], own_weight=row[0, i]))
        assert torch.equal(together[i], alone[0]), i


def test_robust_mean_is_plain_mixing_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    w = drop_messages(metropolis_hastings(build("small-world", 40, seed=1)), 0.2, np.random.default_rng(0))
    flat = torch.randn(40, 25, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(robust_mix(weighted_mean, w, flat), mix(row_normalise(w), {"x": flat})["x"], atol=1e-6)
    whole = robust_mix(get_rule("median"), w, flat)
    monkeypatch.setattr("p2prec.gossip.robust._CHUNK_ELEMENTS", 3 * 25)  # a few rows per chunk
    assert torch.equal(robust_mix(get_rule("median"), w, flat), whole)


def test_a_hub_does_not_pad_everyone_to_its_degree(monkeypatch: pytest.MonkeyPatch) -> None:
    w = metropolis_hastings(build("star", 60))
    n = w.shape[0]
    assert np.diff(w.indptr)[-1] == n  # the last node is the hub: everyone else, and itself
    monkeypatch.setattr("p2prec.gossip.robust._CHUNK_ELEMENTS", 2 * (n - 1) * 10)
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr("p2prec.gossip.robust.Neighbourhood.__post_init__",
                        lambda self: seen.append(tuple(self.received.shape)))
    robust_mix(weighted_mean, w, torch.randn(n, 10))
    # the leaves are padded to one slot only, the hub alone to its degree
    assert seen == [(n - 1, 1, 10), (1, n - 1, 10)]


@pytest.mark.parametrize("k", [1, 2, 7, 8, 11])
def test_sort_few_sorts_like_torch_sort(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    values = torch.randint(-3, 4, (5, k, 40), generator=g).float()  # many ties
    values[0, 0, :5] = torch.inf
    values[1, -1, :5] = -torch.inf
    assert torch.equal(sort_few(values), values.sort(dim=1).values)
    assert torch.equal(sort_few(values, block=7), values.sort(dim=1).values)  # blocks that do not divide P


def test_config_rule_names_match_the_registry() -> None:
    field = RobustConfig.__dataclass_fields__["rule"]
    assert field.metadata["choices"] == RULES
    with pytest.raises(ValueError, match="unknown robust rule"):
        get_rule("krum")


def test_the_norm_bound_drops_outrageous_states_and_leaves_a_clean_round_alone() -> None:
    """A state 50 times the neighbourhood's scale is dropped at every receiver, its weight
    moved to the receiver's own state (so the honest columns still sum to one); a clean round
    returns ``None`` (the matrix stands bit for bit); the vectorised form agrees with
    :func:`within_norm_bound` row by row."""
    gen = torch.Generator().manual_seed(3)
    w = sp.csr_matrix(metropolis_hastings(nx.cycle_graph(6)))
    states = {"a": torch.randn(6, 5, generator=gen), "b": torch.randn(6, 3, 2, generator=gen)}
    norms = state_norms(states)
    assert bound_mixing(w, norms, norms, 3.0)[:2] == (None, 0)
    forged = {k: v.clone() for k, v in states.items()}
    for v in forged.values():
        v[2] = 50.0
    sent = state_norms(forged)
    bounded, dropped, links = bound_mixing(w, sent, norms, 3.0)
    assert bounded is not None and dropped == 2   # node 2's two neighbours each drop its state
    assert sorted(links.tolist()) == [1 * 6 + 2, 3 * 6 + 2]   # receiver * n + sender
    dense, before = bounded.toarray(), w.toarray()
    assert np.allclose(dense.sum(axis=1), 1.0)
    for i in range(6):
        cols = [j for j in range(6) if before[i, j] and j != i]
        keep = within_norm_bound(float(norms[i]), [float(sent[j]) for j in cols], 3.0)
        assert [j for j, k in zip(cols, keep) if k] == [j for j in cols if dense[i, j]], i
    assert dense[1, 2] == 0 and dense[3, 2] == 0 and np.array_equal(dense[2], before[2])
    assert np.allclose(dense[1], np.where(np.arange(6) == 2, 0, before[1]) + before[1, 2] * (np.arange(6) == 1))
    honest = [0, 1, 3, 4, 5]
    assert np.allclose(dense[np.ix_(honest, honest)].sum(axis=0), 1.0)   # the honest sums are kept
    assert bound_mixing(w, sent, norms, 0.0)[:2] == (None, 0)   # 0 turns the check off
    sent[4] = float("nan")
    assert bound_mixing(w, sent, norms, 0.0).w[3, 4] == 0   # never a non-finite state


@pytest.mark.parametrize("quarantine", [True, False])
def test_a_cut_link_keeps_the_honest_trackers_sum_after_the_forger_turns_honest(quarantine: bool) -> None:
    """Gradient tracking needs the trackers' sum kept by every mixing. Node 2 forges in round 1
    and is dropped by its neighbours, then sends its true state; its true tracker has mixed in
    its neighbours' while they kept their weight. With the quarantine the cut links stay cut,
    so the honest nodes' sum is the same after round 2 as before round 1 (mixing among them
    stays doubly stochastic) and node 2's mass never enters it; without it, round 2 lets that
    mass in and the sum moves."""
    gen = torch.Generator().manual_seed(5)
    w = sp.csr_matrix(metropolis_hastings(nx.cycle_graph(6)))
    y = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    honest = [0, 1, 3, 4, 5]
    start = y[honest].sum(0)
    rule = NormBound(3.0, quarantine)
    forged = y.clone()
    forged[2] = 50.0
    first = rule.apply(w, state_norms({"a": forged}), state_norms({"a": y}))
    y = torch.from_numpy(first @ y.numpy())
    assert rule.dropped == 2
    second = rule.apply(w, state_norms({"a": y}), state_norms({"a": y}))   # a clean round
    y = torch.from_numpy((w if second is None else second) @ y.numpy())
    if quarantine:
        assert rule.dropped == 4 and sorted(rule.cut.tolist()) == [1 * 6 + 2, 3 * 6 + 2]
        assert torch.allclose(y[honest].sum(0), start)
    else:
        assert second is None and rule.dropped == 2 and not len(rule.cut)
        assert not torch.allclose(y[honest].sum(0), start)


def test_each_nodes_own_norm_bound_cuts_what_the_simulators_cuts() -> None:
    """A real node keeps a :class:`NormBound` for its row, the simulator one for all rows: over
    rounds with a forger that turns honest, each node's row of the simulator's matrix is the
    one its own rule gives, cuts included."""
    gen = torch.Generator().manual_seed(7)
    w = sp.csr_matrix(metropolis_hastings(nx.cycle_graph(6)))
    together, alone = NormBound(3.0), [NormBound(3.0) for _ in range(6)]
    for forged in (2, 2, None):
        norms = 1.0 + torch.rand(6, generator=gen, dtype=torch.float64)
        sent = norms.clone()
        if forged is not None:
            sent[forged] = 1e4
        stacked = together.apply(w, sent, norms)
        for i in range(6):
            row = alone[i].apply(w[[i]], sent, norms[[i]], row_nodes=[i])
            expected = (w if stacked is None else stacked)[[i]]
            assert np.array_equal((w[[i]] if row is None else row).toarray(), expected.toarray()), i
    assert sorted(together.cut.tolist()) == sorted(k for rule in alone for k in rule.cut.tolist())
    assert together.dropped == sum(rule.dropped for rule in alone) == 6   # 2 a round, the last one cut


def test_the_norm_bound_is_measured_against_the_lower_median() -> None:
    """One neighbour and the own state: the lower of the two is the scale, so a forger cannot
    inflate it; with an honest majority the median is honest."""
    assert list(within_norm_bound(1.0, [2.9], 3.0)) == [True]
    assert list(within_norm_bound(1.0, [3.1], 3.0)) == [False]
    assert list(within_norm_bound(1.0, [1.1, 100.0, 0.9], 3.0)) == [True, False, True]
    assert list(within_norm_bound(1.0, [], 3.0)) == []
