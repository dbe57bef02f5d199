"""The evolver interface: what the creator calls to turn parent prompts into children.

An evolve method (``evolve.method``) is a :class:`PromptEvolver` plus one entry in
:data:`eva_ray.evolve.methods.EVOLVE_METHODS`. The creator calls it once per step, after measuring the batch's
informativeness, from an asyncio task of its own:

    jobs = evolver.plan(parents, n_children)            # None, or the requests drawn now (recorded as in flight)
    batch = await (evolver.run_plan(jobs, step=step) if jobs is not None
                   else evolver.evolve(parents, n_children, step=step))
    batch.children                                      # PromptRecords made with eva_ray.records.make_child
    batch.counts                                        # ok + rejected + failed == requested

and saves ``evolver.state_dict()`` in its checkpoint (JSON-serialisable), to hand it back to ``load_state_dict`` on
resume. Children must be validated against the creator's duplicate index (the validator the method was built with)
and registered in it when accepted, so siblings and buffer entries are never repeated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from eva_ray.evolve.evolver import EvolveBatch, EvolveJob
    from eva_ray.records import PromptRecord


class PromptEvolver(ABC):
    """Evolves parents into children. Subclasses implement :meth:`evolve` and own a seeded ``rng``.

    The default state is ``rng``'s: right for an evolver whose every random choice comes from that generator.
    One that keeps more (a learned model, a cache) overrides :meth:`state_dict` and :meth:`load_state_dict`.
    """

    rng: np.random.Generator

    @abstractmethod
    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        """Up to ``n_children`` children per parent, in parent order, born at ``step``.

        A child's id must be stable for a given (parent, step, attempt): :func:`eva_ray.records.make_child` does it.
        Nothing a single request does may sink the batch: count it as rejected or failed instead.
        """

    def plan(self, parents: Sequence[PromptRecord], n_children: int) -> list[EvolveJob] | None:
        """Draw the requests now, before any work starts, so a checkpoint can record exactly what is in flight and
        a resumed run can issue it again (:meth:`run_plan`). ``None`` (the default): the work draws as it runs, and
        the creator calls :meth:`evolve` instead."""
        return None

    async def run_plan(self, jobs: Sequence[EvolveJob], *, step: int) -> EvolveBatch:
        """Make the requests of a :meth:`plan`. Only evolvers whose ``plan`` returns jobs need it."""
        raise NotImplementedError(f"{type(self).__name__}.plan returns jobs but run_plan is not implemented")

    def state_dict(self) -> Any:
        """What a checkpoint keeps of this evolver (JSON-serialisable)."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state: Any) -> None:
        """Continue from :meth:`state_dict`."""
        self.rng.bit_generator.state = state
