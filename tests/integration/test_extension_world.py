"""A world written in test code alone (no project file edited): registered, configured by name with its own
params, evolved by the curriculum evolver through the world interface, and run for a few inline steps."""

import numpy as np
import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.worlds import World, WorldParamError, register_world
from eva_ray.worlds.base import Task, WORLDS
from launch.driver import run


class ReverseWorld(World):
    """Reverse a string of digits; difficulty = its length."""

    name = "test_reverse"
    rewards = {"exact": "eva_ray.worlds.base:exact_answer_reward"}
    default_reward = "exact"
    param_defaults = {"alphabet": "0123456789", "max_length": 4}

    def __init__(self, params=None, *, seed=0):
        super().__init__(params, seed=seed)
        if not isinstance(self.params["max_length"], int) or self.params["max_length"] < 1:
            raise WorldParamError(f"world.params.max_length: {self.params['max_length']!r}; allowed: an integer >= 1")
        self.levels = tuple(range(1, self.params["max_length"] + 1))
        self.default_mix = {d: 1.0 for d in self.levels}

    def draw_task(self, knobs, rng):
        alphabet = self.params["alphabet"]
        text = "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=int(knobs["difficulty"])))
        return Task(text, {"answer": text[::-1], "difficulty": len(text)})

    def knobs(self, record):
        if not record.prompt_text or any(c not in self.params["alphabet"] for c in record.prompt_text):
            raise ValueError("not a reverse task")
        return {"difficulty": len(record.prompt_text)}

    def answer(self, record):
        return record.prompt_text[::-1]


@pytest.fixture
def reverse_world():
    register_world(ReverseWorld)
    yield ReverseWorld
    WORLDS.pop(ReverseWorld.name)


def test_a_registered_world_is_a_config_choice_with_its_own_params(reverse_world):
    cfg = load_config(None, ["world.name=test_reverse", "world.params.max_length=3"])
    assert cfg.world.reward == "exact"
    with pytest.raises(ConfigError, match="world.params.max_length"):
        load_config(None, ["world.name=test_reverse", "world.params.max_length=0"])
    with pytest.raises(ConfigError, match="world.level_mix"):
        load_config(None, ["world.name=test_reverse", "world.level_mix=[1, 1]"])  # 4 levels by default
    with pytest.raises(ConfigError, match="harder, sibling, easier"):
        load_config(None, ["world.name=test_reverse", "evolve.method=curriculum", "evolve.operators=[more_terms]"])


@pytest.mark.slow
def test_a_few_inline_steps_in_the_test_world(reverse_world, tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={tmp_path}", "world.name=test_reverse", "world.seed_size=16", "world.eval_per_level=3",
        "world.level_mix=[0, 1, 1, 1]", "evolve.method=curriculum", "creator.capacity=8", "run.total_steps=9",
        "logging.eval_every=3", "reward.function=null", "reward.backend=function", "reward.model=null"])
    summary = run(cfg, inline=True, echo=lambda line: None)
    assert summary.steps_done == 9 and summary.error is None
    assert list(dict.fromkeys(summary.phases)) == ["warm-up", "mix-up", "bootstrap"]
    evolved = [line for line in (tmp_path.glob("*/lineage.jsonl").__next__()).read_text().splitlines()
               if '"evolved"' in line]
    assert evolved  # the curriculum evolver moved this world's tasks through its interface
    assert set(summary.eval_start) >= {"accuracy", "accuracy_level_1", "expected_accuracy_level_4"}
    # The teacher-forced probability of a 4-digit answer under a random tiny model is tiny but positive.
    assert 0 < summary.eval["expected_accuracy_level_4"] < 0.01
    assert summary.health["coverage"] > 0 and "info_learnability_corr" in summary.health
