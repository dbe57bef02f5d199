"""select_indices: exact weighted sampling without replacement, the zero-weight fallback, and greedy top-k."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np
import pytest

from eva_ray.sampling import SAMPLING_MODES, clean_weights, select_indices


def draws(weights, k, n, *, mode="sample", seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(select_indices(weights, k, mode=mode, rng=rng).tolist()) for _ in range(n)]


def test_each_mode_draws_as_named_and_no_other_mode_is_served():
    w = [1.0, 5.0, 2.0, 4.0]
    assert set(draws(w, 2, 50, mode="greedy")) == {(1, 3)}  # top-k by decreasing weight, every time
    assert len({frozenset(d) for d in draws(w, 2, 200, mode="sample")}) == 6  # weighted: every pair turns up
    for mode in SAMPLING_MODES:
        assert len(select_indices(w, 2, mode=mode, rng=np.random.default_rng(0))) == 2
    with pytest.raises(ValueError, match="unknown sampling mode 'softmax'; allowed: " + ", ".join(SAMPLING_MODES)):
        select_indices(w, 2, mode="softmax", rng=np.random.default_rng(0))


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_reproducible_with_the_same_seed(mode):
    w = np.random.default_rng(1).random(50)
    assert draws(w, 5, 20, mode=mode, seed=3) == draws(w, 5, 20, mode=mode, seed=3)
    assert draws(w, 5, 20, seed=3) != draws(w, 5, 20, seed=4)


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_distinct_indices_of_the_requested_size(mode):
    w = [0.0, 3.0, 0.0, 1.0, np.nan, 2.0, -1.0]
    for k in range(len(w) + 1):
        for picked in draws(w, k, 30, mode=mode):
            assert len(picked) == k == len(set(picked))
            assert all(0 <= i < len(w) for i in picked)


def test_k_equals_one_frequency_is_proportional_to_weight():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    counts = Counter(d[0] for d in draws(w, 1, 5000))
    freq = np.array([counts[i] for i in range(4)]) / 5000
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.025)  # ~3.5 standard errors


def test_ordered_pairs_follow_sequential_sampling_without_replacement():
    # P(first=i, second=j) = w_i / S * w_j / (S - w_i): the definition of weighted sampling without replacement.
    w = np.array([1.0, 2.0, 5.0])
    counts = Counter(draws(w, 2, 6000, seed=5))
    total = w.sum()
    for i, j in itertools.permutations(range(3), 2):
        expected = w[i] / total * w[j] / (total - w[i])
        assert counts[(i, j)] / 6000 == pytest.approx(expected, abs=0.02), (i, j)


def test_all_zero_weights_fall_back_to_uniform():
    counts = Counter(d[0] for d in draws(np.zeros(5), 1, 5000, seed=2))
    observed = np.array([counts[i] for i in range(5)])
    chi2 = ((observed - 1000) ** 2 / 1000).sum()
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    pairs = Counter(frozenset(d) for d in draws(np.zeros(4), 2, 3000, seed=2))
    assert len(pairs) == 6 and min(pairs.values()) > 400  # each of the 6 pairs ~500 times


def test_zero_weight_is_never_drawn_while_positive_weights_last():
    w = [0.0, 1.0, 2.0, 3.0]
    for k in (1, 2, 3):
        assert all(0 not in d for d in draws(w, k, 500))
    # Once the positives run out the zero-weight item fills the last slot, every time.
    assert all(d[-1] == 0 and sorted(d) == [0, 1, 2, 3] for d in draws(w, 4, 200))


def test_remaining_slots_are_filled_uniformly_from_zero_weight_items():
    picked = draws([5.0, 0.0, 0.0, 0.0], 2, 3000, seed=9)
    assert all(d[0] == 0 for d in picked)
    counts = Counter(d[1] for d in picked)
    assert sorted(counts) == [1, 2, 3] and min(counts.values()) > 850  # ~1000 each


def test_nan_and_negative_weights_count_as_zero():
    np.testing.assert_array_equal(clean_weights([1.0, np.nan, -2.0, -np.inf, 0.5]), [1.0, 0.0, 0.0, 0.0, 0.5])
    assert all(d == (2,) for d in draws([np.nan, -1.0, 1.0], 1, 200))


def test_near_minimum_weight_stays_samplable():
    # Min-max normalisation would give item 0 weight 0; proportional sampling draws it ~1/2.01 of the time.
    counts = Counter(d[0] for d in draws([1.0, 1.01], 1, 2000))
    assert counts[0] / 2000 == pytest.approx(1.0 / 2.01, abs=0.04)


def test_extreme_weight_ratios_give_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(d == (1,) for d in draws([1e-320, 1.0, 0.0], 1, 100))
        assert all(sorted(d) == [0, 1, 2] for d in draws([1e-320, 1e300, 0.0], 3, 20))


def test_greedy_takes_the_top_k_by_decreasing_weight():
    assert draws([0.1, 5.0, 3.0, 4.0, np.nan], 3, 5, mode="greedy") == [(1, 3, 2)] * 5


def test_greedy_breaks_ties_at_random():
    picked = draws([1.0, 2.0, 2.0, 2.0, 0.0], 2, 1500, mode="greedy", seed=4)
    sets = Counter(frozenset(d) for d in picked)
    assert set(sets) == {frozenset({1, 2}), frozenset({1, 3}), frozenset({2, 3})}
    assert min(sets.values()) > 400  # ~500 each


def test_k_zero_gives_an_empty_int_array():
    out = select_indices([1.0, 2.0], 0, rng=np.random.default_rng(0))
    assert out.shape == (0,) and out.dtype == np.int64


def test_bad_arguments_are_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot select 3 distinct items out of 2"):
        select_indices([1.0, 2.0], 3, rng=rng)
    with pytest.raises(ValueError, match="non-negative"):
        select_indices([1.0, 2.0], -1, rng=rng)
    with pytest.raises(ValueError, match="sample, greedy"):
        select_indices([1.0], 1, mode="topk", rng=rng)
    with pytest.raises(ValueError, match=r"\+inf"):
        select_indices([1.0, np.inf], 1, rng=rng)
    with pytest.raises(ValueError, match="one-dimensional"):
        select_indices([[1.0, 2.0]], 1, rng=rng)
    with pytest.raises(TypeError, match="Generator"):
        select_indices([1.0], 1, rng=42)  # type: ignore[arg-type]
