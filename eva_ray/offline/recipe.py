"""An offline run's training recipe: each ``offline.*`` knob, or the loss's published value where it is unset.

    recipe = resolve_recipe(cfg)        # beta, lr, schedule, warm-up, optimizer, epochs, batch, max lengths
    learner_cfg = for_learner(cfg, recipe)   # the config the learner is built from (solver/learner knobs set)

The loss's values live on its registry entry (``LossSpec.defaults``), so the recipe table has one home.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from eva_ray.losses import get_loss

RECIPE_KNOBS: tuple[str, ...] = ("beta", "lr", "lr_schedule", "warmup_ratio", "optimizer", "epochs", "batch_size",
                                 "max_length", "max_prompt_length")


@dataclass(frozen=True)
class Recipe:
    beta: float
    lr: float
    lr_schedule: str
    warmup_ratio: float
    optimizer: str
    epochs: int
    batch_size: int
    max_length: int
    max_prompt_length: int
    options: dict[str, float] = field(default_factory=dict)
    """The loss's own solver fields (SimPO's ``simpo_gamma``), from its published recipe."""
    from_loss: tuple[str, ...] = ()
    """The knobs that took the loss's published value."""


def resolve_recipe(cfg: Any) -> Recipe:
    """The recipe of ``cfg.solver.algorithm`` under ``cfg.offline``; ValueError names each knob left without a value."""
    spec = get_loss(cfg.solver.algorithm)
    defaults = spec.defaults
    values: dict[str, Any] = {}
    taken: list[str] = []
    missing: list[str] = []
    for knob in RECIPE_KNOBS:
        value = getattr(cfg.offline, knob)
        if value is None and defaults is not None:
            value = getattr(defaults, knob)
            taken.append(knob)
        if value is None:
            missing.append(f"offline.{knob}")
        values[knob] = value
    if missing:
        raise ValueError(f"{', '.join(missing)}: unset, and solver.algorithm {spec.name!r} has no published offline "
                         "recipe to take them from; set them")
    if values["max_prompt_length"] >= values["max_length"]:
        raise ValueError(f"offline.max_prompt_length: {values['max_prompt_length']} leaves no room for a response "
                         f"within offline.max_length {values['max_length']}")
    options = dict(defaults.options) if defaults is not None else {}
    unknown = [name for name in options if not hasattr(cfg.solver, name)]
    if unknown:
        raise ValueError(f"solver.algorithm {spec.name!r}: its recipe sets {', '.join(unknown)}, which the solver "
                         "section has no field for")
    return Recipe(**values, options=options, from_loss=tuple(taken))


def for_learner(cfg: Any, recipe: Recipe) -> Any:
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
