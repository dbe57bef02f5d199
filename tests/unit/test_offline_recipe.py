"""resolve_recipe: each offline.<knob> set wins, an unset one is the loss's published value, and a loss with no
published recipe needs every knob set (the error names them)."""

from __future__ import annotations

import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.offline.recipe import RECIPE_KNOBS, Recipe, resolve_recipe

BASE = ["reward.function=a.b:c", "run.mode=offline"]


def test_unset_knobs_take_the_losss_published_recipe(offline_losses):
    recipe = resolve_recipe(load_config(None, [*BASE, "solver.algorithm=dpo"]))
    published = offline_losses["dpo"].defaults
    assert recipe == Recipe(**{k: getattr(published, k) for k in RECIPE_KNOBS}, options={},
                            from_loss=RECIPE_KNOBS)
    if published.max_length == 2048:  # the paper's DPO recipe (the stand-in's, and the registry's if it has dpo)
        assert (recipe.batch_size, recipe.max_prompt_length, recipe.epochs) == (8, 1024, 2)


def test_set_knobs_override_and_options_come_from_the_spec(offline_losses):
    cfg = load_config(None, [*BASE, "solver.algorithm=test_simpo", "offline.lr=1e-6", "offline.batch_size=16",
                             "offline.optimizer=rmsprop", "offline.max_length=4096"])
    recipe = resolve_recipe(cfg)
    assert (recipe.lr, recipe.batch_size, recipe.optimizer, recipe.max_length) == (1e-6, 16, "rmsprop", 4096)
    assert (recipe.beta, recipe.epochs, recipe.max_prompt_length) == (10.0, 1, 1024)  # SimPO's own
    assert recipe.options == {"simpo_gamma": 5.0}
    assert set(recipe.from_loss) == set(RECIPE_KNOBS) - {"lr", "batch_size", "optimizer", "max_length"}
    assert resolve_recipe(load_config(None, [*BASE, "solver.algorithm=test_sppo"])).lr_schedule == "linear"


def test_a_loss_without_a_recipe_names_every_unset_knob():
    with pytest.raises(ConfigError) as err:  # checked when the config loads
        load_config(None, [*BASE, "solver.algorithm=oaif", "offline.lr=1e-6", "offline.epochs=1"])
    message = str(err.value)
    assert message.startswith("offline.beta, offline.lr_schedule, offline.warmup_ratio, offline.optimizer, "
                              "offline.batch_size, offline.max_length, offline.max_prompt_length: unset")
    assert "'oaif'" in message and "offline.lr," not in message and "offline.epochs" not in message
    every = [f"offline.{k}={v}" for k, v in dict(beta=0.1, lr=1e-6, lr_schedule="constant", warmup_ratio=0,
                                                   optimizer="adamw", epochs=1, batch_size=4, max_length=512,
                                                   max_prompt_length=128).items()]
    recipe = resolve_recipe(load_config(None, [*BASE, "solver.algorithm=oaif", *every]))
    assert (recipe.beta, recipe.batch_size, recipe.options) == (0.1, 4, {})
    # Online, offline.* is not read, so nothing is asked of it.
    load_config(None, ["reward.function=a.b:c", "solver.algorithm=oaif"])


def test_a_prompt_limit_that_leaves_no_response_is_an_error(offline_losses):
    with pytest.raises(ConfigError, match="offline.max_prompt_length: 2048 leaves no room"):
        load_config(None, [*BASE, "solver.algorithm=dpo", "offline.max_prompt_length=2048"])


def test_for_learner_writes_the_recipe_into_the_learners_knobs():
    from eva_ray.offline.recipe import for_learner

    cfg = load_config(None, [*BASE, "solver.algorithm=simpo", "offline.lr=2e-6", "solver.simpo_gamma=1.5"])
    learner_cfg = for_learner(cfg, resolve_recipe(cfg))
    assert (learner_cfg.solver.beta, learner_cfg.solver.simpo_gamma) == (10.0, 1.5)  # SimPO's beta, the set gamma
    assert (learner_cfg.learner.lr, learner_cfg.learner.lr_schedule, learner_cfg.learner.optimizer) == (
        2e-6, "cosine", "adamw")
    assert learner_cfg.run.overlap == "off"
    sppo = load_config(None, [*BASE, "solver.algorithm=sppo"])
    assert for_learner(sppo, resolve_recipe(sppo)).learner.optimizer == "rmsprop"


@pytest.mark.parametrize("overrides, message", [
    (["solver.algorithm=rloo"], "solver.algorithm: rloo trains on groups of online samples; run.mode=offline"),
    (["solver.algorithm=dpo", "evolve.method=none"], "evolve.method: 'none' evolves nothing"),
    (["solver.algorithm=dpo", "offline.beta=0"], "offline.beta"),
])
def test_offline_configs_that_cannot_run_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *overrides])
    assert load_config(None, [*BASE, *overrides, "run.mode=online"] if "rloo" in overrides[0] else
                       [*BASE, "solver.algorithm=dpo", "offline.arm=static", "evolve.method=none"])
