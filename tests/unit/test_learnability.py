"""The learnability metric p(1 - p): largest at a success rate of one half, zero where the solver always or never
succeeds, and unlike the advantages it does not rank a prompt solved once in N above one solved N/2 times."""

import numpy as np
import pytest

from eva_ray.informativeness import score_prompts


def test_learnability_of_binary_rewards():
    rewards = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    scores = score_prompts(rewards, "learnability").scores
    assert scores == pytest.approx([0.1875, 0.25, 0.0, 0.0, 0.1875])
    # a_avg prefers the prompt solved once (0.75) to the one solved half the time (0.5); learnability the opposite
    a_avg = score_prompts(rewards, "a_avg").scores
    assert a_avg[0] > a_avg[1] and scores[1] > scores[0]


def test_learnability_drops_invalid_rewards_and_clips_the_rate():
    scores = score_prompts([[1.0, np.nan, 0.0], [2.0, 3.0, 5.0], [-1.0, -2.0, 0.0]], "learnability")
    assert scores.scores == pytest.approx([0.25, 0.0, 0.0]) and scores.n_dropped == 1
