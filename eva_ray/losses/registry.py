"""The loss registry: what the learner, driver, planner and config need to know about each solver loss.

A :class:`LossSpec` names the loss function and states the facts its callers act on: which batch view it trains
on, the unit its mean runs over, when it reads the reference model, whether ``beta`` must be positive, and whether
it takes old log-probs (ratio clipping) and importance weights (off-policy correction). ``solver.algorithm``'s
choices are this registry's names; nothing else in the project compares the algorithm's name.

This module does not import torch: the config and the planner read specs without loading it. The function is named
by its import path and imported on first use (or given as a callable, which is how a test registers a toy loss).

Every loss is called the same way, with the keyword arguments its spec allows::

    loss, stats = spec.fn(logprobs, ref_logprobs, mask, rewards, beta=solver.beta, **spec.options_for(solver),
                          old_logprobs=..., clip_eps=...,   # only when spec.ratio
                          is_weights=...)                   # only when spec.importance_weights

``logprobs``, ``ref_logprobs`` (None when the spec needs no reference at this beta), ``mask``: ``[B, T]``;
``rewards``: ``[P, N]`` with ``B = P * N``, responses grouped per prompt contiguously (under the ``"pairs"`` view,
``N = 2``: best then worst). ``stats`` holds detached 0-dim tensors, logged as ``train/<name>``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

VIEWS: tuple[str, ...] = ("groups", "pairs")
"""Batch views: every response of each prompt group, or only the best and worst of each group with spread."""
UNITS: tuple[str, ...] = ("sequence", "token", "group")
"""Units a loss averages over; the learner weighs each micro-batch by its share of them (``eva_ray.batching``)."""
REFERENCE_USES: tuple[str, ...] = ("always", "kl", "never")
"""When the loss reads the reference model: always, only through a ``beta``-weighted KL (so not at beta 0), never."""
TARGETS: tuple[str, ...] = ("rewards", "win_probs")
"""What the ``rewards`` argument holds: the responses' rewards, or (SPPO) each response's estimated probability of
beating the policy, ``P(y > pi | x)`` in ``[0, 1]``, which only a caller holding every response of a prompt (the
offline loop) can estimate."""


@dataclass(frozen=True)
class TrainingDefaults:
    """A loss's published training recipe for offline (iterative) preference optimisation, overridable per run.

    The offline loop reads these where ``offline.<field>`` is unset; ``options`` are solver fields of the loss's own
    (``{"simpo_gamma": 5.0}``).
    """

    beta: float
    lr: float
    lr_schedule: str
    warmup_ratio: float
    epochs: int
    batch_size: int
    """Effective batch: preference pairs per optimizer update."""
    max_length: int
    """Longest prompt + response in tokens."""
    max_prompt_length: int
    optimizer: str
    """``adamw`` or ``rmsprop`` (``learner.optimizer``)."""
    options: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """One solver loss and the facts about it that the code around it acts on."""

    name: str
    """The value of ``solver.algorithm`` that selects it."""
    fn: str | Callable[..., Any]
    """``"package.module:function"`` (imported on first use) or the function itself."""
    view: str = "groups"
    """The batch it trains on: ``"groups"`` (all N responses per prompt) or ``"pairs"`` (best and worst only)."""
    unit: str | Callable[[Any], str] = "sequence"
    """What its mean runs over (one of :data:`UNITS`), or a function of the solver config that says so."""
    reference: str = "kl"
    """When it needs the frozen reference model (one of :data:`REFERENCE_USES`)."""
    beta_positive: bool = False
    """``beta`` is part of the loss itself (DPO's temperature), not an optional KL weight: it must be > 0."""
    ratio: bool = False
    """Takes ``old_logprobs`` and ``clip_eps``: the importance ratio (and its clip) for several updates per batch."""
    importance_weights: bool = False
    """Takes ``is_weights``: per-token weights that correct rollouts sampled by an older policy."""
    options: dict[str, str] = field(default_factory=dict)
    """Its own keyword arguments, each read from a ``solver`` field: ``{loss keyword: solver field}``."""
    targets: str = "rewards"
    """What its ``rewards`` argument holds (one of :data:`TARGETS`); ``win_probs`` losses run offline only."""
    defaults: TrainingDefaults | None = None
    """The published offline recipe (learning rate, epochs, batch, ...), or None for an online-only loss."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("view", self.view, VIEWS), ("reference", self.reference, REFERENCE_USES),
                                     ("targets", self.targets, TARGETS)):
            if value not in allowed:
                raise ValueError(f"loss {self.name!r}: {name} {value!r}; allowed: {', '.join(allowed)}")
        if not callable(self.unit) and self.unit not in UNITS:
            raise ValueError(f"loss {self.name!r}: unit {self.unit!r}; allowed: {', '.join(UNITS)} or a function")

    @property
    def loss_fn(self) -> Callable[..., Any]:
        """The loss function (imported now when given by path)."""
        if callable(self.fn):
            return self.fn
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)

    def needs_reference(self, beta: float) -> bool:
        """Whether a run with this ``beta`` needs the reference model at all (else none is loaded or placed)."""
        return self.reference == "always" or (self.reference == "kl" and beta != 0)

    @property
    def needs_spread(self) -> bool:
        """A batch without reward spread holds nothing to train on: a pair needs two different rewards."""
        return self.view == "pairs"

    def unit_for(self, solver: Any) -> str:
        """The unit under this solver config."""
        unit = self.unit(solver) if callable(self.unit) else self.unit
        if unit not in UNITS:
            raise ValueError(f"loss {self.name!r}: unit {unit!r}; allowed: {', '.join(UNITS)}")
        return unit

    def options_for(self, solver: Any) -> dict[str, Any]:
        """The loss's own keyword arguments, read from the solver config."""
        return {keyword: getattr(solver, knob) for keyword, knob in self.options.items()}

    def check_beta(self, beta: float) -> str | None:
        """Why ``beta`` cannot run with this loss (a message naming ``solver.beta``), or None."""
        if self.beta_positive and not beta > 0:
            return f"solver.beta: {beta} with solver.algorithm {self.name!r}; it needs beta > 0"
        return None


LOSSES: dict[str, LossSpec] = {}
"""Every registered loss by name, in registration order (the config's choices for ``solver.algorithm``)."""


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to :data:`LOSSES`; a name already taken is an error (remove it first to replace it)."""
    if spec.name in LOSSES:
        raise ValueError(f"a loss named {spec.name!r} is already registered")
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    """The spec registered under ``name``; ValueError names the allowed ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; allowed: {sorted(LOSSES)}") from None
