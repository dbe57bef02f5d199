"""A new evolve method is a PromptEvolver and one registration: this file adds one without editing the project.

The toy method puts a persona in front of each parent prompt. Registered here, it becomes an allowed
``evolve.method``, and a real inline run (tiny models) trains on its children and checkpoints its state.
"""

import json
from collections.abc import Sequence

import numpy as np
import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.evolver import EvolveBatch, EvolveCounts
from eva_ray.evolve.methods import EVOLVE_METHODS, EvolveMethod, register_evolve_method
from eva_ray.evolve.validate import EvolveValidator
from eva_ray.lineage import read_lineage
from eva_ray.records import PromptRecord, make_child

PERSONAS = ("a ship's cook", "a tired astronomer", "a beekeeper in winter", "a retired chess champion")


class PersonaEvolver(PromptEvolver):
    """Each child asks its parent's question in the voice of a seeded random persona."""

    def __init__(self, validator: EvolveValidator, seed: int) -> None:
        self.validator = validator
        self.rng = np.random.default_rng(seed)
        self.made = 0

    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        counts, children, outcomes = EvolveCounts(), [], []
        for parent in parents:
            for index in range(n_children):
                persona = PERSONAS[int(self.rng.integers(len(PERSONAS)))]
                counts.requested += 1
                text, reason = self.validator.check(f"Speaking as {persona}: {parent.prompt_text}",
                                                    parent.prompt_text)
                if text is None:
                    counts.rejected[reason] += 1
                    outcomes.append({"outcome": "rejected", "reason": reason, "step": step, "parent_id": parent.id,
                                     "operator": "persona", "index": index})
                    continue
                self.validator.register(text)
                counts.ok += 1
                children.append(make_child(parent, text, operator="toy_persona", step=step, index=index))
        self.made += len(children)
        return EvolveBatch(children=children, counts=counts, outcomes=outcomes)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "made": self.made}

    def load_state_dict(self, state) -> None:
        self.rng.bit_generator.state, self.made = state["rng"], state["made"]


@pytest.fixture
def toy_method():
    """Registers ``evolve.method=toy`` for one test; ``built`` holds the evolvers the factory made."""
    built: list[PersonaEvolver] = []

    def build(cfg, validator, llm):
        built.append(PersonaEvolver(validator, cfg.run.seed + 1))  # never opens the LLM: llm() is not called
        return built[-1]

    register_evolve_method(EvolveMethod("toy", build))
    try:
        yield built
    finally:
        del EVOLVE_METHODS["toy"]


def test_the_config_allows_exactly_the_registered_methods(toy_method):
    cfg = load_config("configs/tiny.yaml", ["evolve.method=toy"])
    assert cfg.evolve.method == "toy"
    with pytest.raises(ConfigError, match=r"evolve.method: 'toy2' is not allowed; allowed: llm, curriculum, none, "
                                          r"replay, toy$"):
        load_config("configs/tiny.yaml", ["evolve.method=toy2"])
    with pytest.raises(ValueError, match="registered already"):
        register_evolve_method(EvolveMethod("toy", lambda cfg, validator, llm: None))


@pytest.mark.slow
def test_an_inline_run_trains_on_a_toy_methods_children_and_checkpoints_its_state(toy_method, tmp_path, tiny_cache,
                                                                                  monkeypatch):
    from launch.driver import run

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "evolve.method=toy", "run.total_steps=6",
                                            "learner.checkpoint_every=3", "logging.eval_every=100"])
    summary = run(cfg, inline=True, echo=lambda line: None)

    assert summary.error is None and summary.steps_done == 6
    assert "mix-up" in summary.phases  # the buffer filled with the toy's children
    (evolver,) = toy_method
    creator = summary.final["creator"]
    assert creator["evolve_ok"] == evolver.made > 0
    assert creator["llm_calls"] == 0 and summary.final["provider"] == {}  # no evolve LLM was opened
    lineage = read_lineage(next(tmp_path.glob("*/lineage.jsonl")))
    trained = [e for e in lineage if e["event"] == "trained" and e["source"] == "evolved"]
    assert trained and {e["operator"] for e in trained} == {"toy_persona"}
    saved = json.loads(next(tmp_path.glob("*/checkpoints/step-00000003/creator.json")).read_text())
    assert set(saved["evolver_rng"]) == {"rng", "made"} and 0 < saved["evolver_rng"]["made"] <= evolver.made
