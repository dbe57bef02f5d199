"""The curriculum evolver: evolves a world's prompts by moving them along the world's knobs.

Where an LLM evolver rewrites a prompt in words, a world with a generator and a verifier (see
:mod:`eva_ray.worlds.base`) can make the paper's two kinds of evolution exactly, with a correct answer attached. The
operators are the world's moves (``World.moves``); every world has

- in-depth ``harder``: one level up; a parent at the top level cannot go up and is rejected as
  ``at_max_difficulty``;
- in-breadth ``sibling``: a fresh task at the parent's own level;
- ``easier``: one level down (rejected as ``at_min_difficulty`` at the bottom), so that a creator whose parents sit
  just past the solver's frontier can still make prompts that are "challenging yet solvable";

and a world may add its own (chain_sum's ``more_terms``). Which task a move makes is the world's choice
(``World.child_task``): a fresh task at the new knobs, or an edit of the parent.

The interface is the :class:`~eva_ray.evolve.evolver.Evolver`'s: ``await evolve(parents, n_children, step=step)``
returns an :class:`~eva_ray.evolve.evolver.EvolveBatch` whose counts satisfy ``ok + rejected + failed ==
requested``; children are made with :func:`~eva_ray.records.make_child` (lineage, operator name, inherited
informativeness) and carry the new task's meta (answer, difficulty, the world's knobs). Operators are drawn from a
seeded generator in parent order, with configurable weights, and every task is drawn from that same generator, so
one seed gives one set of children.

Validation reuses the creator's :class:`~eva_ray.evolve.validate.EvolveValidator` (its duplicate index holds the seed
set and the buffer): a child that is already there is redrawn up to ``max_tries`` times, then rejected as
``duplicate_in_buffer`` (or ``near_duplicate_parent`` when it is the parent itself). The default validator normalises
text for natural language (punctuation dropped, so ``57-87=`` and ``57+87=`` collide, and near-duplicates by
character shingles, although ``12345+1=`` and ``12345+2=`` are different tasks); :class:`ExactTextValidator` keeps
the same interface with exact-text semantics and is the one to give the creator for a world.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.evolver import EvolveBatch, EvolveCounts
from eva_ray.evolve.validate import (
    DUPLICATE_IN_BUFFER,
    EMPTY,
    NEAR_DUPLICATE_BUFFER,
    NEAR_DUPLICATE_PARENT,
    EvolveValidator,
)
from eva_ray.records import PromptRecord, make_child
from eva_ray.worlds import World, make_world
from eva_ray.worlds.base import AT_MAX_DIFFICULTY, AT_MIN_DIFFICULTY, EASIER, HARDER

DEFAULT_WEIGHTS: dict[str, float] = {"harder": 0.4, "sibling": 0.4, "easier": 0.2}
"""Mostly a step past the parent or beside it; the parents are already the most informative prompts (at the
solver's frontier), so a child one level up is the 'challenging yet solvable' move and ``easier`` is the fallback
for parents that overshot. A world's own moves (chain_sum's ``more_terms``) are off unless named."""

NOT_A_TASK = "not_a_task"
_RETRYABLE = (DUPLICATE_IN_BUFFER, NEAR_DUPLICATE_PARENT, NEAR_DUPLICATE_BUFFER)


def _exact_key(text: str) -> str:
    return "".join(str(text).split())


@dataclass(eq=False)
class ExactTextValidator(EvolveValidator):
    """An :class:`EvolveValidator` for procedural tasks: two prompts are duplicates only when their texts are equal
    (whitespace ignored; case and punctuation kept, so ``57-87=`` and ``57+87=`` stay different).

    Same interface as its parent (``register``, ``unregister``, ``reason``, ``check``, ``rejections``,
    ``accepted``), so the creator registers its seed set and buffer in it and unregisters what leaves, unchanged.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._texts: set[str] = set()

    def __len__(self) -> int:
        return len(self._texts)

    def __contains__(self, text: str) -> bool:
        return _exact_key(text) in self._texts

    def register(self, text: str) -> None:
        key = _exact_key(text)
        if key:
            self._texts.add(key)

    def unregister(self, text: str) -> None:
        self._texts.discard(_exact_key(text))

    def reason(self, text: str, parent_text: str, instructions: str | None = None) -> str | None:
        # ``instructions`` (the LLM request's wording) has no meaning for a generated task; kept for the interface.
        key = _exact_key(text)
        if not key:
            return EMPTY
        if key == _exact_key(parent_text):
            return NEAR_DUPLICATE_PARENT
        if key in self._texts:
            return DUPLICATE_IN_BUFFER
        return None


def _weights(operators: Sequence[str] | None, weights: Sequence[float] | Mapping[str, float] | None,
             allowed: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    if isinstance(weights, Mapping):
        if operators is not None:
            raise ValueError("give the operators either as a weights mapping or as a list, not both")
        operators, weights = list(weights), list(weights.values())
    if operators is None:
        if weights is not None:
            raise ValueError("operator weights need the operators they weigh")
        operators, weights = list(DEFAULT_WEIGHTS), list(DEFAULT_WEIGHTS.values())
    names = tuple(operators)
    unknown = [n for n in names if n not in allowed]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"curriculum operators must be distinct names from {tuple(allowed)}, got {list(names)}")
    w = np.ones(len(names)) if weights is None else np.asarray(list(weights), dtype=float)
    if w.shape != (len(names),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"operator weights must be {len(names)} non-negative numbers with a positive sum, "
                         f"got {list(weights) if weights is not None else None}")
    return names, w / w.sum()


class CurriculumEvolver(PromptEvolver):
    """Evolves a world's prompts along its knobs; see the module docstring.

    ``world`` is a :class:`~eva_ray.worlds.base.World` or a registered world's name (built with default params).
    ``operators`` / ``weights``: which of the world's moves and how often (a list plus aligned weights, or a
    ``{name: weight}`` mapping; default :data:`DEFAULT_WEIGHTS`). Difficulty stays within ``[min_difficulty,
    max_difficulty]`` (default the world's levels). ``max_tries``: fresh draws per attempt before a duplicate is
    counted as a rejection. ``steer``: a parent whose ``meta["success_rate"]`` (set by the creator) is 0 gets only
    ``easier`` children and one at 1 only ``harder`` ones (when the world has those moves); the rest draw as usual.
    """

    method = "curriculum"

    def __init__(self, *, world: str | World = "chain_sum", operators: Sequence[str] | None = None,
                 weights: Sequence[float] | Mapping[str, float] | None = None,
                 validator: EvolveValidator | None = None, rng_seed: int = 0, min_difficulty: int | None = None,
                 max_difficulty: int | None = None, max_tries: int = 4, steer: bool = False) -> None:
        self.world = make_world(world) if isinstance(world, str) else world
        self.steer = steer
        self.operators, self.probs = _weights(operators, weights, self.world.moves)
        self.validator = validator if validator is not None else ExactTextValidator()
        self.rng = np.random.default_rng(rng_seed)
        levels = self.world.levels
        self.min_difficulty = levels[0] if min_difficulty is None else int(min_difficulty)
        self.max_difficulty = levels[-1] if max_difficulty is None else int(max_difficulty)
        if not 0 <= self.min_difficulty <= self.max_difficulty:
            raise ValueError(f"need 0 <= min_difficulty <= max_difficulty, got {self.min_difficulty}, "
                             f"{self.max_difficulty}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.max_tries = max_tries

    # ------------------------------------------------------------------------------------------------------------
    def _reject(self, counts: EvolveCounts, reason: str, outcomes: list[dict[str, Any]], where: dict[str, Any],
                text: str | None = None) -> None:
        counts.rejected[reason] += 1
        self.validator.rejections[reason] += 1
        outcomes.append(where | {"outcome": "rejected", "reason": reason, "text": text})

    def _attempt(self, parent: PromptRecord, operator: str, index: int, step: int,
                 counts: EvolveCounts, outcomes: list[dict[str, Any]]) -> PromptRecord | None:
        where = {"step": step, "parent_id": parent.id, "operator": operator, "index": index}
        try:
            try:
                knobs = self.world.knobs(parent)
            except ValueError:
                self._reject(counts, NOT_A_TASK, outcomes, where)
                return None
            new_knobs, why = self.world.move(operator, knobs, min_difficulty=self.min_difficulty,
                                             max_difficulty=self.max_difficulty)
            if why is not None:
                self._reject(counts, why, outcomes, where)
                return None
            for _ in range(self.max_tries):
                task = self.world.child_task(operator, parent, new_knobs, self.rng)
                why = self.validator.reason(task.text, parent.prompt_text)
                if why not in _RETRYABLE:
                    break
        except Exception as exc:  # noqa: BLE001 - a broken generator is one failed attempt, not a dead batch
            counts.failed[type(exc).__name__] += 1
            outcomes.append(where | {"outcome": "failed", "cause": type(exc).__name__, "error": str(exc)})
            return None
        if why is not None:
            self._reject(counts, why, outcomes, where, task.text)
            return None
        counts.ok += 1
        self.validator.accepted += 1
        self.validator.register(task.text)  # later siblings of this batch are checked against it
        meta = task.meta() | {"evolve_method": self.method} | {f"parent_{k}": v for k, v in knobs.items()}
        return make_child(parent, task.text, operator=operator, step=step, index=index, meta=meta)

    def _steered(self, parent: PromptRecord) -> str | None:
        """The one operator for a parent the solver never (easier) or always (harder) solved, under ``steer``."""
        rate = (parent.meta or {}).get("success_rate") if self.steer else None
        if rate == 0.0 and EASIER in self.world.moves:
            return EASIER
        if rate == 1.0 and HARDER in self.world.moves:
            return HARDER
        return None

    def evolve_now(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        """:meth:`evolve` without an event loop (the work is a few microseconds of generator calls per child)."""
        if n_children < 0:
            raise ValueError(f"n_children must be >= 0, got {n_children}")
        jobs: list[tuple[PromptRecord, str, int]] = []
        next_index: Counter[str] = Counter()
        for parent in parents:  # all operators first, in parent order (as the LLM evolver does)
            steered = self._steered(parent)
            ops = ([steered] * n_children if steered else
                   [self.operators[int(i)] for i in self.rng.choice(len(self.operators), size=n_children,
                                                                    p=self.probs)])
            for op in ops:
                jobs.append((parent, op, next_index[parent.id]))
                next_index[parent.id] += 1
        counts = EvolveCounts(requested=len(jobs))
        children, outcomes = [], []
        for parent, operator, index in jobs:
            t0 = time.perf_counter()
            child = self._attempt(parent, operator, index, step, counts, outcomes)
            counts.latencies_s.append(time.perf_counter() - t0)
            if child is not None:
                children.append(child)
        return EvolveBatch(children=children, counts=counts, outcomes=outcomes)

    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        """Up to ``n_children`` validated children per parent, in parent order; ids as in ``Evolver.evolve``."""
        return self.evolve_now(parents, n_children, step=step)

    async def evolve_tree_bon(self, *args: Any, **kwargs: Any) -> EvolveBatch:
        raise NotImplementedError("tree best-of-N needs an LLM judge; evolve.method 'curriculum' does not support it")


__all__ = ["AT_MAX_DIFFICULTY", "AT_MIN_DIFFICULTY", "CurriculumEvolver", "DEFAULT_WEIGHTS",
           "ExactTextValidator", "NOT_A_TASK"]
