"""The cipher world's evaluation on real inline actors: teacher-forced expected accuracy agrees with what sampling
actually solves, and the shipped solver's start is what its pretraining made it (copying: greedy solves nothing)."""

import math
from pathlib import Path

import numpy as np
import pytest

from eva_ray.config import load_config
from eva_ray.worlds import world_of
from launch.cluster import start_system
from launch.driver import Evaluator, _world_tokenizer, load_prompts, with_resolved_models, with_world_defaults
from launch.handles import gather

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_expected_accuracy_matches_sampled_solves(tmp_path):
    cfg = with_world_defaults(with_resolved_models(load_config(REPO / "configs" / "cipher.yaml", [
        f"run.output_dir={tmp_path}", "world.eval_per_level=40", "world.seed_size=32", "solver.n_responses=2"])))
    train, held_out, _ = load_prompts(cfg)
    system = start_system(cfg, train, tmp_path, inline=True, echo=lambda *a: None)
    try:
        world = world_of(cfg)
        evaluator = Evaluator(system, held_out, world=world, tokenizer=_world_tokenizer(cfg))
        acc = evaluator.accuracy()
        # The pretrained solver copies its input: greedy decoding never encrypts, so nothing is solved.
        assert acc["accuracy"] == 0.0
        # pi(answer) ~ 0.078^d: d = 1 about 0.078, d = 2 about 0.006.
        assert 0.05 < acc["expected_accuracy_level_1"] < 0.11
        assert 0.002 < acc["expected_accuracy_level_2"] < 0.012
        assert acc["expected_accuracy_level_6"] < 1e-5
        # Sampled at the rollout temperature, the share of exact answers at d = 1 estimates the same number.
        level1 = [p for p in held_out if p.meta["difficulty"] == 1]
        n = 64
        groups = system.rollout.generate(level1, n)
        rewards = gather([system.reward.call("score", level1, [[r.text for r in g] for g in groups])])[0].rewards
        sampled = float(np.mean(rewards))
        se = math.sqrt(acc["expected_accuracy_level_1"] * (1 - acc["expected_accuracy_level_1"]) / (n * len(level1)))
        assert abs(sampled - acc["expected_accuracy_level_1"]) < 4 * se, (sampled, acc["expected_accuracy_level_1"])
    finally:
        system.shutdown()
