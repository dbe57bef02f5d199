"""The online phase schedule of eva (paper, appendix A): warm-up, mix-up, bootstrap.

One pure function, :func:`plan_batch`, maps the run's state to the composition of the next minibatch and to what the
creator evolves after it:

=========  ===========================================  =============================================  ===========
phase      when                                         minibatch                                      children
=========  ===========================================  =============================================  ===========
warm-up    buffer below capacity B, D not exhausted     all from D                                     ``n_new``
mix-up     buffer full, D not exhausted                 ``ratio_evol`` from the buffer, rest from D    ``n_new``
bootstrap  D exhausted                                  all from the buffer                            ``n_new_bootstrap``
=========  ===========================================  =============================================  ===========

In every phase the ``top_fraction`` most informative prompts of the minibatch become parents. Buffer entries that
were trained on are popped (mix-up, bootstrap) and the buffer evicts its oldest entries to stay at B.

Edge cases the paper leaves open, decided here: when D runs out in the middle of a minibatch, the rest is taken from
the buffer; in mix-up, a buffer too small for its share (it can shrink when few children survive validation) is
topped up from D; once the buffer has been full, warm-up never returns; when the buffer holds fewer prompts than a bootstrap minibatch needs, the plan is marked ``short`` and
the creator waits (boundedly) for evolved prompts. ``bootstrap_refill`` (off by default: not in the paper) raises the
bootstrap children per parent, up to ``n_new``, while the buffer holds less than two minibatches after the pop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eva_ray.config import CreatorConfig

PHASES = ("warm-up", "mix-up", "bootstrap")


_DEFAULTS = CreatorConfig()  # the config holds the defaults (the paper's online setting); this view repeats none


@dataclass(frozen=True)
class PhaseSettings:
    """The knobs of the schedule (a view of ``CreatorConfig``, with its defaults)."""

    batch_size: int = _DEFAULTS.batch_size
    capacity: int = _DEFAULTS.capacity
    n_new: int = _DEFAULTS.n_new
    n_new_bootstrap: int = _DEFAULTS.n_new_bootstrap
    ratio_evol: float = _DEFAULTS.ratio_evol
    top_fraction: float = _DEFAULTS.top_fraction
    bootstrap_refill: bool = _DEFAULTS.bootstrap_refill

    @classmethod
    def from_config(cls, creator_cfg: CreatorConfig) -> PhaseSettings:
        return cls(**{name: getattr(creator_cfg, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RunState:
    """What the schedule needs to know about the run before a step."""

    step: int
    buffer_size: int
    seed_remaining: int
    """Prompts of D not yet handed out (over all of ``seed_epochs``)."""
    warmed_up: bool = False
    """True once the buffer has reached capacity: warm-up ends for good then, even if popping shrinks the buffer
    later (the paper's phases only move forward)."""


@dataclass(frozen=True)
class BatchPlan:
    phase: str
    n_seed: int
    """Prompts taken from D, in order."""
    n_buffer: int
    """Prompts drawn from the buffer by informativeness."""
    n_parents: int
    """Most informative prompts of the minibatch that get evolved after the step."""
    n_children: int
    """Children evolved per parent."""
    short: bool
    """True when the minibatch is smaller than ``batch_size`` because no more prompts are available."""

    @property
    def size(self) -> int:
        return self.n_seed + self.n_buffer

    @property
    def pops_trained(self) -> bool:
        """Whether the buffer entries of this minibatch leave the buffer after training (the paper's 'pop')."""
        return self.n_buffer > 0


def phase_of(state: RunState, settings: PhaseSettings) -> str:
    if state.seed_remaining <= 0:
        return "bootstrap"
    if not state.warmed_up and state.buffer_size < settings.capacity:
        return "warm-up"
    return "mix-up"


def n_parents_for(batch: int, top_fraction: float) -> int:
    """Parents for a minibatch of ``batch`` prompts: ``ceil(top_fraction * batch)`` (8 x 0.5 -> 4, as in the paper).

    A tiny tolerance keeps float error (e.g. 0.3 * 10 = 3.0000000000000004) from adding a parent.
    """
    return min(batch, math.ceil(top_fraction * batch - 1e-9)) if batch > 0 else 0


def plan_batch(state: RunState, settings: PhaseSettings) -> BatchPlan:
    """The composition of the next minibatch and the evolve work after it."""
    phase = phase_of(state, settings)
    batch = settings.batch_size
    if phase == "warm-up":
        wanted_from_buffer = 0
    elif phase == "mix-up":
        # Round half up so ratio 0.5 of an odd batch leans to the buffer, like the paper's "half of the minibatch".
        wanted_from_buffer = min(batch, math.floor(settings.ratio_evol * batch + 0.5))
    else:
        wanted_from_buffer = batch
    seed_left = max(state.seed_remaining, 0)
    n_seed = min(batch - wanted_from_buffer, seed_left)
    n_buffer = min(batch - n_seed, state.buffer_size)
    n_seed = min(batch - n_buffer, seed_left)  # a buffer too small for its share is topped up from D
    size = n_seed + n_buffer
    n_parents = n_parents_for(size, settings.top_fraction)
    n_children = settings.n_new if phase != "bootstrap" else settings.n_new_bootstrap
    if phase == "bootstrap" and settings.bootstrap_refill and n_parents:
        # The paper's bootstrap pops batch_size entries and adds n_new_bootstrap children per parent: with top 50%
        # and 2 children that only breaks even when no child is rejected, so any rejection drains the buffer until
        # the run starves. Refill: enough children (up to n_new) to bring the buffer back to two minibatches.
        deficit = 2 * batch - (state.buffer_size - n_buffer)
        n_children = min(max(n_children, math.ceil(deficit / n_parents)), max(settings.n_new, n_children))
    return BatchPlan(
        phase=phase,
        n_seed=n_seed,
        n_buffer=n_buffer,
        n_parents=n_parents,
        n_children=n_children,
        short=size < batch,
    )


def simulate(settings: PhaseSettings, seed_size: int, steps: int, *, seed_epochs: int = 1) -> list[BatchPlan]:
    """Walk a run assuming every evolve call succeeds: the phase timeline a config will produce.

    Useful to check a config before spending a cluster on it (how many steps of warm-up, when D runs out).
    """
    plans = []
    buffer_size, seed_remaining, warmed_up = 0, seed_size * seed_epochs, False
    for step in range(steps):
        warmed_up = warmed_up or buffer_size >= settings.capacity
        plan = plan_batch(RunState(step, buffer_size, seed_remaining, warmed_up), settings)
        plans.append(plan)
        seed_remaining -= plan.n_seed
        buffer_size -= plan.n_buffer  # trained buffer entries are popped
        buffer_size = min(settings.capacity, buffer_size + plan.n_parents * plan.n_children)
    return plans
