"""Creator health: reward spread, skill coverage (a constructed starving buffer), and what informativeness tracks."""

import math

import numpy as np
import pytest

from eva_ray.health import CreatorHealth
from eva_ray.informativeness import score_prompts
from eva_ray.worlds import make_world


def prompts(w, letters_marked):
    return [w.task(letters, marked).record(f"p{i}") for i, (letters, marked) in enumerate(letters_marked)]


def test_a_buffer_that_replays_two_letters_is_starving_and_says_which_letters():
    w = make_world("cipher", seed=0)
    health = CreatorHealth(w, window=3)
    batch = prompts(w, [("abcdef", {0}), ("bacdef", {0}), ("abcdef", {0, 1}), ("cccccc", {0, 1, 2})])
    rewards = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    for _ in range(3):
        out = health.update(batch, rewards, score_prompts(rewards, "a_avg").scores)
    assert out["coverage"] == pytest.approx(0.2)  # a and b only; the d = 3 prompt covers no unit
    assert out["starving"] == 1.0 and health.uncovered() == list("cdefghij")
    assert out["spread_fraction"] == 0.5 and out["spread_fraction_window"] == 0.5


def test_covering_every_letter_is_healthy_and_the_window_forgets():
    w = make_world("cipher", seed=0)
    health = CreatorHealth(w, window=2)
    every = prompts(w, [("abcdef", {i}) for i in range(6)] + [("ghijaa", {0, 1}), ("ijaaaa", {0, 1})])
    out = health.update(every, [[0, 1]] * len(every), [0.5] * len(every))
    assert out["coverage"] == 1.0 and out["starving"] == 0.0
    narrow = prompts(w, [("abcdef", {0})])
    health.update(narrow, [[0, 0]], [0.0])
    assert health.metrics()["coverage"] == 1.0  # the first step is still in the window
    health.update(narrow, [[0, 0]], [0.0])
    assert health.metrics()["coverage"] == pytest.approx(0.1) and health.metrics()["starving"] == 1.0


def test_correlations_show_whether_informativeness_tracks_success_or_learnability():
    rng = np.random.default_rng(0)
    rates = rng.uniform(0, 1, size=64)
    rewards = (rng.uniform(size=(64, 16)) < rates[:, None]).astype(float)
    health = CreatorHealth(None, window=1)
    out = health.update([], rewards, score_prompts(rewards, "learnability").scores)
    assert out["info_learnability_corr"] == pytest.approx(1.0) and "coverage" not in out
    out = CreatorHealth(None).update([], rewards, score_prompts(rewards, "reward_mean").scores)
    assert out["info_success_corr"] == pytest.approx(1.0) and abs(out["info_learnability_corr"]) < 0.5
    flat = CreatorHealth(None).update([], [[0, 0]] * 5, [0.0] * 5)
    assert math.isnan(flat["info_learnability_corr"]) and flat["spread_fraction"] == 0.0
