"""Informativeness metrics: hand-computed values, invalid rewards, ragged input, and a loop reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from eva_ray.config import CreatorConfig
from eva_ray.informativeness import DEFAULT_METRIC, METRICS, InfoScores, score_prompts

# One prompt, rewards [0, 1, 3, 4]: max 4, min 0, mean 2, second max 3, population variance (4+1+1+4)/4 = 2.5.
ROW = [[0.0, 1.0, 3.0, 4.0]]
EXPECTED = {
    "a_min": 4.0,
    "a_avg": 2.0,
    "a_dis": 1.0,
    "reward_var": 2.5,
    "reward_mean": 2.0,
    "inv_reward_mean": 1.0 / (2.0 + 1e-3),
    "inv_a_min": 1.0 / (4.0 + 1e-3),
    "uniform": 1.0,
    "learnability": 0.0,  # mean 2 is clipped to a success rate of 1
}


def test_metric_table_and_defaults():
    assert set(EXPECTED) == set(METRICS)
    # The paper's baselines: the mean reward online (A_avg = max - mean), the min offline (A_min = max - min).
    rows = np.array([[0.0, 1.0, 3.0, 4.0], [2.0, 2.0, 5.0, 9.0]])
    online = score_prompts(rows, DEFAULT_METRIC["online"]).scores
    offline = score_prompts(rows, DEFAULT_METRIC["offline"]).scores
    np.testing.assert_allclose(online, rows.max(1) - rows.mean(1), rtol=1e-12)
    np.testing.assert_allclose(offline, rows.max(1) - rows.min(1), rtol=1e-12)
    assert CreatorConfig().metric == DEFAULT_METRIC["online"]  # a run is online eva


@pytest.mark.parametrize("metric", METRICS)
def test_hand_computed_value(metric):
    out = score_prompts(ROW, metric)
    assert isinstance(out, InfoScores)
    assert out.scores.dtype == np.float64 and out.scores.shape == (1,)
    assert out.scores[0] == pytest.approx(EXPECTED[metric], rel=1e-12)
    assert out.n_valid.tolist() == [4] and out.n_dropped == 0


def test_a_dis_ties_and_single_response():
    # A tie at the top means no margin; one response has no second-best, so no margin either.
    out = score_prompts([[5.0, 5.0, 1.0], [2.0, np.nan, np.nan]], "a_dis")
    assert out.scores.tolist() == [0.0, 0.0]
    single = score_prompts([[7.0]], "a_dis")
    assert single.scores.tolist() == [0.0]


def test_a_dis_ignores_invalid_entries_when_finding_second_max():
    # Second max among the valid rewards [2, 9, 4] is 4 (the inf must not count as the max).
    out = score_prompts([[2.0, np.inf, 9.0, np.nan, 4.0]], "a_dis")
    assert out.scores.tolist() == [5.0]


def test_inverse_metrics_use_eps_and_clip_negative_mean():
    # mean -3 is clipped to 0, so the score is 1 / eps; zero advantage likewise gives 1 / eps, not inf.
    out = score_prompts([[-4.0, -2.0], [1.0, 1.0]], "inv_reward_mean", inverse_eps=0.5)
    assert out.scores.tolist() == [2.0, 1.0 / 1.5]
    flat = score_prompts([[3.0, 3.0, 3.0]], "inv_a_min")
    assert flat.scores.tolist() == [pytest.approx(1000.0)]


def test_non_finite_rewards_are_dropped_and_counted():
    rewards = np.array([[1.0, np.nan, np.inf, 3.0], [np.nan, -np.inf, np.nan, np.nan], [2.0, 2.0, 2.0, 8.0]])
    out = score_prompts(rewards, "a_avg")
    assert out.scores[0] == 1.0  # max 3 - mean 2 over the finite [1, 3]
    assert math.isnan(out.scores[1])  # no finite reward: no score, not a zero score
    assert out.scores[2] == 8.0 - 3.5
    assert out.n_valid.tolist() == [2, 0, 4]
    assert out.n_dropped == 2 + 4


@pytest.mark.parametrize("metric", METRICS)
def test_no_warnings_leak_on_empty_rows_or_overflow(metric):
    rewards = np.array([[np.nan, np.nan], [1e308, -1e308]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = score_prompts(rewards, metric)
    assert math.isnan(out.scores[0])
    assert not math.isnan(out.scores[1])


def test_ragged_input_is_padded_and_padding_is_not_dropped():
    out = score_prompts([[1.0, 2.0], [3.0], [], [np.nan, 5.0, 0.0]], "a_min")
    assert out.scores[:2].tolist() == [1.0, 0.0]
    assert math.isnan(out.scores[2])
    assert out.scores[3] == 5.0
    assert out.n_valid.tolist() == [2, 1, 0, 2]
    assert out.n_dropped == 1  # only the real NaN, not the padding of the short rows


def test_equal_length_lists_integers_and_empty_batch():
    assert score_prompts([[1, 3], [2, 2]], "a_min").scores.tolist() == [2.0, 0.0]
    empty = score_prompts([], "a_min")
    assert empty.scores.shape == (0,) and empty.n_dropped == 0
    no_responses = score_prompts(np.zeros((2, 0)), "a_avg")
    assert np.isnan(no_responses.scores).all() and no_responses.n_valid.tolist() == [0, 0]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="a_min.*a_avg"):
        score_prompts(ROW, "regret")
    with pytest.raises(ValueError, match="2-D"):
        score_prompts([1.0, 2.0, 3.0], "a_min")
    with pytest.raises(ValueError, match="one-dimensional"):
        score_prompts([[1.0], [[1.0, 2.0]], [1.0, 2.0]], "a_min")
    with pytest.raises(ValueError, match="inverse_eps"):
        score_prompts(ROW, "inv_a_min", inverse_eps=0.0)


def _reference(row: list[float], metric: str, eps: float) -> float:
    """A plain-Python, one-prompt version of every metric, to check the vectorised one against."""
    r = sorted(x for x in row if math.isfinite(x))
    if not r:
        return math.nan
    mean = sum(r) / len(r)
    second = r[-2] if len(r) > 1 else r[-1]
    return {
        "a_min": r[-1] - r[0],
        "a_avg": r[-1] - mean,
        "a_dis": r[-1] - second,
        "reward_var": sum((x - mean) ** 2 for x in r) / len(r),
        "reward_mean": mean,
        "inv_reward_mean": 1.0 / (max(mean, 0.0) + eps),
        "inv_a_min": 1.0 / (r[-1] - r[0] + eps),
        "uniform": 1.0,
        "learnability": min(max(mean, 0.0), 1.0) * (1.0 - min(max(mean, 0.0), 1.0)),
    }[metric]


@pytest.mark.parametrize("metric", METRICS)
def test_vectorised_matches_loop_reference(metric):
    rng = np.random.default_rng(7)
    rewards = rng.normal(size=(64, 6)).round(1)  # rounding makes ties common
    rewards[rng.random(rewards.shape) < 0.2] = np.nan
    rewards[3] = np.nan
    rewards[5, :5] = np.nan  # one valid response
    out = score_prompts(rewards, metric, inverse_eps=0.01)
    expected = [_reference(row.tolist(), metric, 0.01) for row in rewards]
    np.testing.assert_allclose(out.scores, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert out.n_valid.tolist() == np.isfinite(rewards).sum(axis=1).tolist()
