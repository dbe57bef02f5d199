"""Learner.begin_iteration: an offline iteration starts like a fresh training job from the policy saved before it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from eva_ray.batching import collate
from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig
from eva_ray.rollouts import Rollout
from eva_ray.tiny import save_tiny_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


def pair_batch(seed: int):
    """6 preference pairs (chosen first, reward 1 vs 0) of random printable-character ids."""
    rng = random.Random(seed)
    groups = []
    for p in range(6):
        prompt = [rng.randrange(7, 103) for _ in range(rng.randint(4, 9))]
        groups.append([Rollout(f"p{p}", prompt, [rng.randrange(7, 103) for _ in range(rng.randint(5, 12))], "",
                               "stop", 0) for _ in range(2)])
    return collate(groups, [[1.0, 0.0]] * 6, pad_token_id=0)


def make_learner(path: str, stage: int, total_steps: int):
    from actors.learner import Learner

    return Learner(path, solver=SolverConfig(algorithm="oaif", beta=0.1),
                   learner=LearnerConfig(zero_stage=stage, lr=1e-3, micro_batch_size=4, lr_schedule="cosine",
                                         warmup_ratio=0.5),
                   model=ModelConfig(), total_steps=total_steps, seed=0)


def weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.get_weights()[1].items()}


@pytest.mark.parametrize("stage", [0, 2])
def test_begin_iteration_equals_a_fresh_learner_from_the_saved_policy(policy_path, tmp_path, stage):
    saved = str(tmp_path / "iteration-1")
    first = make_learner(policy_path, stage, total_steps=4)
    try:
        for seed in (1, 2):
            first.train_step(pair_batch(seed))
        first.save(saved)
        first.begin_iteration(3, saved)
        # A fresh schedule over 3 updates: warm-up ceil(0.5 * 3) = 2 updates, the first at half the peak.
        assert first.lr == pytest.approx(5e-4)
        state = first._client_optimizer.state.values()
        assert state and all(not torch.is_tensor(v) or not v.any() for s in state for v in s.values())
        # The reference is now the policy itself: every pair's log-ratio difference is 0, the DPO loss log 2.
        metrics = [first.train_step(pair_batch(3)), first.train_step(pair_batch(4))]
        assert metrics[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
        resumed = weights(first)
    finally:
        first.close()

    fresh = make_learner(saved, stage, total_steps=3)
    try:
        expected = [fresh.train_step(pair_batch(3)), fresh.train_step(pair_batch(4))]
        reference = weights(fresh)
    finally:
        fresh.close()
    for got, want in zip(metrics, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5, abs=1e-7)
        assert got["train/lr"] == pytest.approx(want["train/lr"])
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) < 1e-6


def test_begin_iteration_rejects_an_empty_iteration(policy_path):
    learner = make_learner(policy_path, 0, total_steps=2)
    try:
        with pytest.raises(ValueError, match="updates must be >= 1"):
            learner.begin_iteration(0)
    finally:
        learner.close()
