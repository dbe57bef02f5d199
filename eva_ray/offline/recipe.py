"""The training recipe of an offline (iterative) run: each ``offline.<knob>`` the user set, else the loss's published
value (:class:`~eva_ray.losses.registry.TrainingDefaults` on its spec).

    recipe = resolve_recipe(cfg)         # Recipe(beta=0.05, lr=5e-07, ..., batch_size=8, max_length=2048, ...)
    learner_cfg = for_learner(cfg, recipe)   # the config the learner is built from (solver/learner knobs set)

The offline loop, the learner and ``eva-ray plan`` all read the recipe from here, so they cannot disagree on what an
unset knob means. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eva_ray.config import ConfigError
from eva_ray.losses import get_loss

if TYPE_CHECKING:
    from eva_ray.config import Config

RECIPE_KNOBS: tuple[str, ...] = ("beta", "lr", "lr_schedule", "warmup_ratio", "optimizer", "epochs", "batch_size",
                                 "max_length", "max_prompt_length")
"""The ``offline.*`` knobs that fall back to the loss's defaults (same names on :class:`Recipe`)."""


@dataclass(frozen=True)
class Recipe:
    """What one offline iteration trains with."""

    beta: float
    lr: float
    lr_schedule: str
    warmup_ratio: float
    optimizer: str
    epochs: int
    batch_size: int
    """Effective batch: preference pairs per optimizer update."""
    max_length: int
    """Longest prompt + response in tokens."""
    max_prompt_length: int
    options: dict[str, Any] = field(default_factory=dict)
    """The loss's own solver fields (``{"simpo_gamma": 5.0}``): the solver config's value where it has one set,
    else the published one."""
    from_loss: tuple[str, ...] = ()
    """The knobs that took the loss's published value (the run says so when it starts)."""


class RecipeError(ConfigError):
    """An ``offline.<knob>`` that is unset while the loss publishes no value for it; the message names the knob."""


def resolve_recipe(cfg: Config) -> Recipe:
    """The recipe of ``cfg.solver.algorithm`` under ``cfg.offline``; :class:`RecipeError` names every knob that has
    neither a value nor a published default."""
    spec = get_loss(cfg.solver.algorithm)
    defaults = spec.defaults
    values: dict[str, Any] = {}
    missing, taken = [], []
    for knob in RECIPE_KNOBS:
        value = getattr(cfg.offline, knob)
        if value is None and defaults is not None:
            value = getattr(defaults, knob)
            taken.append(knob)
        if value is None:
            missing.append(f"offline.{knob}")
        values[knob] = value
    if missing:
        raise RecipeError(f"{', '.join(missing)}: unset, and solver.algorithm {spec.name!r} publishes no offline "
                          "training recipe to fall back on; set them, or pick a loss that has one")
    options = dict(defaults.options) if defaults is not None else {}
    unknown = [name for name in options if not hasattr(cfg.solver, name)]
    if unknown:
        raise RecipeError(f"solver.algorithm {spec.name!r}: its recipe sets {', '.join(unknown)}, which the solver "
                          "section has no field for")
    for name in options:
        set_value = getattr(cfg.solver, name, None)
        if set_value is not None:
            options[name] = set_value
    if values["max_prompt_length"] >= values["max_length"]:
        raise RecipeError(f"offline.max_prompt_length: {values['max_prompt_length']} leaves no room for a response "
                          f"in offline.max_length {values['max_length']}")
    return Recipe(**values, options=options, from_loss=tuple(taken))


def recipe_problems(cfg: Config) -> list[str]:
    """The config check's view of :func:`resolve_recipe`: its message, or nothing."""
    try:
        resolve_recipe(cfg)
    except RecipeError as exc:
        return [str(exc)]
    return []


def for_learner(cfg: Config, recipe: Recipe) -> Config:
    """``cfg`` with the recipe written into the knobs the learner reads (``solver.beta``, ``learner.lr``, ...).

    The LR schedule is set again at every iteration (``Learner.begin_iteration``); ``run.total_steps`` only sizes
    the first one until then. Rollouts never overlap training offline: an iteration generates, then trains.
    """
    return dataclasses.replace(
        cfg,
        solver=dataclasses.replace(cfg.solver, beta=recipe.beta, **recipe.options),
        learner=dataclasses.replace(cfg.learner, lr=recipe.lr, lr_schedule=recipe.lr_schedule,
                                    warmup_ratio=recipe.warmup_ratio, optimizer=recipe.optimizer),
        run=dataclasses.replace(cfg.run, overlap="off"),
    )
