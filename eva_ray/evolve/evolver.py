"""The asynchronous evolver: parent prompts in, validated child prompts (with lineage) out.

The evolver does not know which LLM answers: it takes ``complete``, an async callable from chat messages to the
answer text (the creator actor binds LiteLLM to it; tests bind a fake). Calls run concurrently under a semaphore,
and nothing a single call does (raise, time out, return junk) can sink the batch: every attempt ends as exactly one
of *ok*, *rejected* (by validation reason) or *failed* (by exception type), so ``ok + rejected + failed ==
requested`` always holds and the creator's metrics can say where its children went.

Two ways to evolve share one path for call, parse, validate and count (:meth:`Evolver._attempt`):

- :meth:`Evolver.evolve`: ``n_children`` independent children per parent, operators drawn uniformly (the paper's
  default).
- :meth:`Evolver.evolve_tree_bon`: the paper's tree best-of-N (Fig. 11): evolve ``width`` candidates, keep the one a
  scorer likes best, evolve *it* again, ``depth`` times, returning the chain of winners.

Reproducibility: operators come from a seeded generator, drawn in parent order before any call is made, and
answers are validated in that same order after the calls return, so completion order (which a real LLM makes
random) never changes which children are kept or what they are called.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eva_ray.evolve.operators import STYLES, build_messages, choose_operators, get_style, validate_operators
from eva_ray.evolve.validate import EvolveValidator
from eva_ray.records import PromptRecord, make_child

Complete = Callable[[list[dict[str, str]]], Awaitable[str]]
"""An LLM call: chat messages in, the assistant's answer text out."""
Scorer = Callable[[str], "float | Awaitable[float]"]
"""Tree-BoN judge: prompt text in, a score out (higher is better); sync or async."""


@dataclass
class EvolveCounts:
    """Where every requested child went. ``ok + sum(rejected) + sum(failed) == requested``."""

    requested: int = 0
    ok: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Validation reason -> count (see :data:`eva_ray.evolve.validate.REJECTION_REASONS`)."""
    failed: Counter[str] = field(default_factory=Counter)
    """Exception type name of the LLM call -> count (``TimeoutError`` for a call past ``timeout_s``)."""
    latencies_s: list[float] = field(default_factory=list)
    """Wall time of every LLM call that was made, successful or not (semaphore wait excluded)."""
    score_failed: Counter[str] = field(default_factory=Counter)
    """Tree-BoN only: scorer exceptions (or ``non_finite``) by type; such candidates are not selectable."""

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def add(self, other: EvolveCounts) -> None:
        """Accumulate ``other`` into these counts (e.g. over the levels of a tree or the steps of a run)."""
        self.requested += other.requested
        self.ok += other.ok
        self.rejected.update(other.rejected)
        self.failed.update(other.failed)
        self.latencies_s.extend(other.latencies_s)
        self.score_failed.update(other.score_failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "ok": self.ok,
            "rejected": dict(self.rejected),
            "failed": dict(self.failed),
            "latencies_s": list(self.latencies_s),
            "score_failed": dict(self.score_failed),
        }


@dataclass
class EvolveBatch:
    """The accepted children of one evolve call and the counts of all its attempts."""

    children: list[PromptRecord]
    counts: EvolveCounts


@dataclass(frozen=True)
class _Job:
    parent: PromptRecord
    operator: str
    index: int


class Evolver:
    """Evolves prompts with an LLM through ``complete``; see the module docstring.

    ``operators`` defaults to every operator of ``style``. The ``validator`` holds the duplicate index: the buffer's
    owner registers what the buffer holds and unregisters what leaves it; the evolver registers every child it
    accepts, so siblings of one batch are deduplicated against each other. ``timeout_s`` bounds a single call
    (a hung provider must not hold a batch forever). ``system_message=False`` folds the system prompt into the
    user turn, for chat templates that reject a system role.
    """

    def __init__(
        self,
        complete: Complete,
        *,
        style: str = "eva",
        operators: Sequence[str] | None = None,
        validator: EvolveValidator | None = None,
        rng_seed: int = 0,
        max_concurrency: int = 8,
        timeout_s: float | None = None,
        system_message: bool = True,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.complete = complete
        self.style = get_style(style).name
        self.operators = validate_operators(
            STYLES[self.style].operators if operators is None else operators, self.style
        )
        self.validator = validator if validator is not None else EvolveValidator()
        self.rng = np.random.default_rng(rng_seed)
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.system_message = system_message
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    # --- shared path ------------------------------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        # One semaphore per event loop: concurrent evolve calls on the same loop share the limit, and an evolver
        # reused under a fresh loop (asyncio.run in tests, a restarted actor) does not touch a dead loop's primitive.
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._sem

    def _messages(self, job: _Job) -> list[dict[str, str]]:
        return build_messages(job.parent.prompt_text, job.operator, self.style, system=self.system_message)

    async def _call(self, messages: list[dict[str, str]], counts: EvolveCounts) -> str | None:
        """One LLM call; ``None`` (counted as failed by exception type) when it raises or times out."""
        async with self._semaphore():
            t0 = time.perf_counter()
            try:
                if self.timeout_s is None:
                    raw = await self.complete(messages)
                else:
                    raw = await asyncio.wait_for(self.complete(messages), self.timeout_s)
                if not isinstance(raw, str):
                    raise TypeError(f"complete() returned {type(raw).__name__}, expected str")
            except Exception as exc:  # noqa: BLE001 - any provider error is one failed attempt, not a dead batch
                counts.failed[type(exc).__name__] += 1
                return None
            finally:
                counts.latencies_s.append(time.perf_counter() - t0)
        return raw

    async def _attempt(self, jobs: Sequence[_Job], step: int, counts: EvolveCounts) -> list[PromptRecord | None]:
        """Run ``jobs`` concurrently, then parse, validate and register their answers in job order.

        Returns one entry per job: the child, or ``None`` when the call failed or the answer was rejected.
        """
        counts.requested += len(jobs)
        requests = [self._messages(job) for job in jobs]
        raws = await asyncio.gather(*(self._call(messages, counts) for messages in requests))
        out: list[PromptRecord | None] = []
        for job, messages, raw in zip(jobs, requests, raws):
            if raw is None:
                out.append(None)
                continue
            # The request's own wording, without the parent, for the validator's echo check.
            instructions = "\n".join(m["content"] for m in messages).replace(job.parent.prompt_text, "\n")
            clean, reason = self.validator.check(raw, job.parent.prompt_text, instructions)
            if clean is None:
                counts.rejected[reason or "unknown"] += 1
                out.append(None)
                continue
            counts.ok += 1
            self.validator.register(clean)  # later siblings in this loop are now checked against it
            out.append(
                make_child(job.parent, clean, operator=job.operator, step=step, index=job.index,
                           meta={"evolve_style": self.style})
            )
        return out

    # --- plain evolve -----------------------------------------------------------------------------------------------
    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        """Up to ``n_children`` validated children per parent, in parent order.

        A child's id is ``child_id(parent.id, step, k)`` for its attempt number ``k``, so ids stay stable when
        siblings are rejected. A parent listed twice gets distinct attempt numbers; evolving the same parent again
        in another call at the same ``step`` would reuse ids, which the caller must avoid.
        """
        if n_children < 0:
            raise ValueError(f"n_children must be >= 0, got {n_children}")
        jobs: list[_Job] = []
        next_index: Counter[str] = Counter()
        for parent in parents:
            for op in choose_operators(self.rng, n_children, self.operators):
                jobs.append(_Job(parent, op, next_index[parent.id]))
                next_index[parent.id] += 1
        counts = EvolveCounts()
        results = await self._attempt(jobs, step, counts)
        return EvolveBatch(children=[c for c in results if c is not None], counts=counts)

    # --- tree best-of-N ---------------------------------------------------------------------------------------------
    async def _score(self, scorer: Scorer, text: str) -> float:
        async with self._semaphore():  # a scorer is often an LLM judge: same concurrency budget
            value = scorer(text)
            if inspect.isawaitable(value):
                value = await value
        score = float(value)
        if not math.isfinite(score):
            raise _NonFiniteScore(f"scorer returned {score!r}")
        return score

    async def evolve_tree_bon(
        self, parent: PromptRecord, *, width: int, depth: int, scorer: Scorer, step: int
    ) -> EvolveBatch:
        """Tree best-of-N: ``depth`` levels of ``width`` candidates, each level grown from the previous winner.

        Returns the winners, one per level (generation ``parent.generation + 1 .. + depth``; each the parent of
        the next), with their score in ``meta["tree_bon_score"]``. Ties go to the earlier candidate. If no
        candidate of a level survives validation and scoring, the chain stops there. Losing candidates are
        unregistered from the duplicate index again, since they never enter the buffer; ``counts.ok`` still
        counts them as valid answers.
        """
        if width < 1 or depth < 1:
            raise ValueError(f"tree-BoN needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        counts = EvolveCounts()
        chain: list[PromptRecord] = []
        node = parent
        for level in range(1, depth + 1):
            ops = choose_operators(self.rng, width, self.operators)
            jobs = [_Job(node, op, i) for i, op in enumerate(ops)]
            valid = [c for c in await self._attempt(jobs, step, counts) if c is not None]
            scores = await asyncio.gather(*(self._score(scorer, c.prompt_text) for c in valid), return_exceptions=True)
            best: PromptRecord | None = None
            best_score = -math.inf
            for child, score in zip(valid, scores):
                if isinstance(score, BaseException):
                    if not isinstance(score, Exception):
                        raise score  # cancellation and friends are not scorer failures
                    name = "non_finite" if isinstance(score, _NonFiniteScore) else type(score).__name__
                    counts.score_failed[name] += 1
                elif best is None or score > best_score:
                    best, best_score = child, score
            for child in valid:
                if child is not best:
                    self.validator.unregister(child.prompt_text)
            if best is None:
                break
            best.meta.update(tree_bon_score=best_score, tree_bon_level=level)
            chain.append(best)
            node = best
        return EvolveBatch(children=chain, counts=counts)


class _NonFiniteScore(ValueError):
    """A scorer returned NaN or infinity, which would make the arg-max meaningless."""
