"""Evolve methods by name (``evolve.method``): the registry, and the factory the creator builds its evolver with.

    validator = make_validator(cfg)              # the duplicate index the creator keeps in step with D and the buffer
    evolver = build_evolver(cfg, validator, llm)  # a PromptEvolver, or None for evolve.method=none

A method is a :class:`~eva_ray.evolve.base.PromptEvolver` and one registration::

    register_evolve_method(EvolveMethod("mine", build=lambda cfg, validator, llm: MyEvolver(...)))

``build(cfg, validator, llm)`` gets the run's config, the validator its children must pass (and be registered in),
and ``llm``: a function that opens the evolve LLM (``evolve.model``) and returns its ``complete(messages) -> str``;
only methods that use an LLM call it. ``check(cfg)`` lists the method's config problems before any actor starts.
``evolve.method``'s allowed values are this registry's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.curriculum import CurriculumEvolver, ExactTextValidator
from eva_ray.evolve.evolver import Complete, Evolver, TreeBoNEvolver
from eva_ray.evolve.judge import llm_judge_scorer
from eva_ray.evolve.operators import validate_operators
from eva_ray.evolve.replay import ReplayEvolver
from eva_ray.evolve.validate import EvolveValidator
from eva_ray.worlds import WORLDS, get_world, world_of

if TYPE_CHECKING:
    from eva_ray.config import Config, EvolveConfig

OpenLLM = Callable[[], Complete]
"""Opens the evolve LLM and returns its ``complete``; the creator's binding (LiteLLM) or a test's fake."""
Build = Callable[["Config", EvolveValidator, OpenLLM], "PromptEvolver | None"]


def similarity_validator(cfg: EvolveConfig) -> EvolveValidator:
    """Natural-language prompts: near-duplicates by similarity to the parent and to the buffer."""
    return EvolveValidator(max_length_ratio=cfg.max_length_ratio, parent_similarity=cfg.parent_similarity,
                           buffer_similarity=cfg.buffer_similarity)


def style_operator_problems(cfg: Config) -> list[str]:
    """``evolve.operators`` must belong to ``evolve.style``."""
    if cfg.evolve.operators is None:
        return []
    try:
        validate_operators(cfg.evolve.operators, cfg.evolve.style)
    except ValueError as exc:
        return [f"evolve.operators: {exc}"]
    return []


@dataclass(frozen=True)
class EvolveMethod:
    """One ``evolve.method``: how to build its evolver and validator, and what config it needs."""

    name: str
    build: Build
    validator: Callable[[EvolveConfig], EvolveValidator] = similarity_validator
    check: Callable[[Config], list[str]] = style_operator_problems


EVOLVE_METHODS: dict[str, EvolveMethod] = {}
"""Every registered method by name, in registration order (the order ``evolve.method``'s choices are listed in)."""


def register_evolve_method(method: EvolveMethod) -> EvolveMethod:
    if method.name in EVOLVE_METHODS:
        raise ValueError(f"evolve method {method.name!r} is registered already")
    EVOLVE_METHODS[method.name] = method
    return method


def evolve_method(name: str) -> EvolveMethod:
    if name not in EVOLVE_METHODS:
        raise ValueError(f"evolve.method: {name!r} is not allowed; allowed: {', '.join(EVOLVE_METHODS)}")
    return EVOLVE_METHODS[name]


def make_validator(cfg: Config) -> EvolveValidator:
    """The validator of the configured method (the creator registers D and the buffer in it)."""
    return evolve_method(cfg.evolve.method).validator(cfg.evolve)


def build_evolver(cfg: Config, validator: EvolveValidator, llm: OpenLLM) -> PromptEvolver | None:
    """The configured method's evolver, checking children with ``validator``; ``None`` when nothing evolves."""
    return evolve_method(cfg.evolve.method).build(cfg, validator, llm)


# ------------------------------------------------------------------------------------------------- the shipped ones


def build_llm(cfg: Config, validator: EvolveValidator, llm: OpenLLM) -> PromptEvolver:
    """An LLM rewrites each parent with a meta-prompt operator; tree best-of-N when ``evolve.tree_bon_width`` > 0."""
    ev = cfg.evolve
    complete = llm()
    evolver = Evolver(complete, style=ev.style, operators=ev.operators, validator=validator,
                      rng_seed=cfg.run.seed + 1, max_concurrency=ev.concurrency, timeout_s=ev.timeout_s,
                      deadline_s=ev.deadline_s, max_retries=ev.max_retries, retry_backoff_s=ev.retry_backoff_s,
                      system_message=ev.system_message)
    if ev.tree_bon_width > 0:
        return TreeBoNEvolver(evolver, scorer=llm_judge_scorer(complete), width=ev.tree_bon_width,
                              depth=ev.tree_bon_depth)
    return evolver


def build_curriculum(cfg: Config, validator: EvolveValidator, llm: OpenLLM) -> PromptEvolver:
    """A procedural world evolves by moving tasks along its difficulty knobs: no LLM involved."""
    return CurriculumEvolver(world=world_of(cfg), operators=cfg.evolve.operators, weights=cfg.evolve.operator_weights,
                             validator=validator, rng_seed=cfg.run.seed + 1, steer=cfg.evolve.steer_by_success)


def exact_validator(cfg: EvolveConfig) -> EvolveValidator:
    # Task expressions differ by a sign or a digit ("57-87=" vs "57+87="): only exact repeats are duplicates.
    return ExactTextValidator()


def curriculum_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.world.name is None:
        return ["evolve.method: 'curriculum' moves tasks along a world's difficulty; set world.name "
                f"(allowed: {', '.join(WORLDS)})"]
    if cfg.world.name not in WORLDS:
        return []  # world.name's own check names it
    moves = get_world(cfg.world.name).moves
    unknown = [op for op in cfg.evolve.operators or [] if op not in moves]
    if unknown:
        problems.append(f"evolve.operators: {unknown} are not moves of world {cfg.world.name}; allowed: "
                        f"{', '.join(moves)}")
    return problems


def build_none(cfg: Config, validator: EvolveValidator, llm: OpenLLM) -> None:
    """The static-D baseline: nothing is evolved, the buffer stays empty."""
    return None


register_evolve_method(EvolveMethod("llm", build_llm))
register_evolve_method(EvolveMethod("curriculum", build_curriculum, validator=exact_validator,
                                    check=curriculum_problems))
register_evolve_method(EvolveMethod("none", build_none))
register_evolve_method(EvolveMethod("replay", lambda cfg, validator, llm: ReplayEvolver(cfg.run.seed + 1),
                                    validator=exact_validator, check=lambda cfg: []))
