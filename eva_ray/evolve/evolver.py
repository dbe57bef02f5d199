"""The asynchronous evolver: parent prompts in, validated child prompts (with lineage) out.

The evolver does not know which LLM answers: it takes ``complete``, an async callable from chat messages to the
answer text (the creator actor binds LiteLLM to it; tests bind a fake). Calls run concurrently under a semaphore,
and nothing a single call does (raise, time out, return junk) can sink the batch: every request ends as exactly one
of *ok*, *rejected* (by validation reason) or *failed* (by cause: ``rate_limit``, ``timeout``, ``connection``,
``bad_request``, ...; see :func:`failure_cause`), so ``ok + rejected + failed == requested`` always holds and the
creator's metrics can say where its children went.

A request whose call fails for a passing reason (rate limit, timeout, connection, server error) is tried again,
with backoff, and every attempt and request is bounded in time: the call policy of :mod:`eva_ray.evolve.calls`,
which the offline rewriter shares.

Two ways to evolve share one path for call, parse, validate and count (:meth:`Evolver._attempt`):

- :meth:`Evolver.evolve`: ``n_children`` independent children per parent, operators drawn uniformly (the paper's
  default).
- :meth:`Evolver.evolve_tree_bon`: the paper's tree best-of-N (Fig. 11): evolve ``width`` candidates, keep the one a
  scorer likes best, evolve *it* again, ``depth`` times, returning the chain of winners. :class:`TreeBoNEvolver`
  offers it to the creator as an evolver of its own.

Reproducibility: operators come from a seeded generator, drawn in parent order before any call is made, and
answers are validated in that same order after the calls return, so completion order (which a real LLM makes
random) never changes which children are kept or what they are called.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.calls import (CONFIG_CAUSES, RETRYABLE_CAUSES, BadAnswer, Complete, LLMCaller,  # noqa: F401
                                  failure_cause)
from eva_ray.evolve.operators import STYLES, build_messages, choose_operators, get_style, validate_operators
from eva_ray.evolve.validate import EvolveValidator
from eva_ray.records import PromptRecord, make_child

Scorer = Callable[[str], "float | Awaitable[float]"]
"""Tree-BoN judge: prompt text in, a score out (higher is better); sync or async."""

_EVENT_TEXT_CHARS = 2000  # how much of a rejected answer or an error message an outcome keeps


@dataclass
class EvolveCounts:
    """Where every requested child went. ``ok + sum(rejected) + sum(failed) == requested``."""

    requested: int = 0
    ok: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Validation reason -> count (see :data:`eva_ray.evolve.validate.REJECTION_REASONS`)."""
    failed: Counter[str] = field(default_factory=Counter)
    """Cause of the last failed attempt of a request (:func:`failure_cause`) -> count."""
    retried: Counter[str] = field(default_factory=Counter)
    """Cause of a failed attempt that was tried again -> count (retries are not requests: they add to no total)."""
    latencies_s: list[float] = field(default_factory=list)
    """Wall time of every LLM attempt that was made, successful or not (semaphore wait excluded)."""
    score_failed: Counter[str] = field(default_factory=Counter)
    """Tree-BoN only: scorer exceptions (or ``non_finite``) by type; such candidates are not selectable."""

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def n_retried(self) -> int:
        return sum(self.retried.values())

    def add(self, other: EvolveCounts) -> None:
        """Accumulate ``other`` into these counts (e.g. over the levels of a tree or the steps of a run)."""
        self.requested += other.requested
        self.ok += other.ok
        self.rejected.update(other.rejected)
        self.failed.update(other.failed)
        self.retried.update(other.retried)
        self.latencies_s.extend(other.latencies_s)
        self.score_failed.update(other.score_failed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvolveCounts:
        return cls(requested=data["requested"], ok=data["ok"], rejected=Counter(data["rejected"]),
                   failed=Counter(data["failed"]), retried=Counter(data.get("retried", {})),
                   latencies_s=list(data["latencies_s"]), score_failed=Counter(data["score_failed"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "ok": self.ok,
            "rejected": dict(self.rejected),
            "failed": dict(self.failed),
            "retried": dict(self.retried),
            "latencies_s": list(self.latencies_s),
            "score_failed": dict(self.score_failed),
        }


@dataclass
class EvolveBatch:
    """The accepted children of one evolve call, the counts of all its requests, and what became of the others."""

    children: list[PromptRecord]
    counts: EvolveCounts
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    """One entry per request that gave no child: ``outcome`` (``rejected`` or ``failed``), the parent id, operator,
    attempt index and step, and the ``reason`` with the answer's ``text``, or the ``cause`` with the ``error``."""


@dataclass(frozen=True)
class EvolveJob:
    """One planned request: evolve ``parent`` with ``operator``; ``index`` numbers the parent's children."""

    parent: PromptRecord
    operator: str
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"parent": self.parent.to_dict(), "operator": self.operator, "index": self.index}


class Evolver(PromptEvolver):
    """Evolves prompts with an LLM through ``complete``; see the module docstring.

    ``operators`` defaults to every operator of ``style``. The ``validator`` holds the duplicate index: the buffer's
    owner registers what the buffer holds and unregisters what leaves it; the evolver registers every child it
    accepts, so siblings of one batch are deduplicated against each other. ``timeout_s`` bounds one attempt (a hung
    provider must not hold a batch forever), ``deadline_s`` one request with all its attempts and backoff waits;
    ``max_retries`` attempts more are made for a retryable cause, the first after ``retry_backoff_s`` (doubling,
    with as much jitter, at most 30 s). ``system_message=False`` folds the system prompt into the user turn, for chat
    templates that reject a system role.
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
        deadline_s: float | None = None,
        max_retries: int = 0,
        retry_backoff_s: float = 1.0,
        system_message: bool = True,
    ) -> None:
        self.caller = LLMCaller(complete, max_concurrency=max_concurrency, timeout_s=timeout_s,
                                deadline_s=deadline_s, max_retries=max_retries, retry_backoff_s=retry_backoff_s)
        self.style = get_style(style).name
        self.operators = validate_operators(
            STYLES[self.style].operators if operators is None else operators, self.style
        )
        self.validator = validator if validator is not None else EvolveValidator()
        self.rng = np.random.default_rng(rng_seed)
        self.system_message = system_message

    # --- shared path ------------------------------------------------------------------------------------------------
    def _messages(self, job: EvolveJob) -> list[dict[str, str]]:
        return build_messages(job.parent.prompt_text, job.operator, self.style, system=self.system_message)

    async def _attempt(self, jobs: Sequence[EvolveJob], step: int, counts: EvolveCounts,
                       outcomes: list[dict[str, Any]]) -> list[PromptRecord | None]:
        """Run ``jobs`` concurrently, then parse, validate and register their answers in job order.

        Returns one entry per job: the child, or ``None`` when the call failed or the answer was rejected (and then
        an entry in ``outcomes`` says why).
        """
        counts.requested += len(jobs)
        requests = [self._messages(job) for job in jobs]
        raws = await asyncio.gather(*(self.caller.call(messages, counts) for messages in requests))
        out: list[PromptRecord | None] = []
        for job, messages, raw in zip(jobs, requests, raws):
            where = {"step": step, "parent_id": job.parent.id, "operator": job.operator, "index": job.index}
            if isinstance(raw, BaseException):
                outcomes.append(where | {"outcome": "failed", "cause": failure_cause(raw),
                                         "error": f"{type(raw).__name__}: {raw}"[:_EVENT_TEXT_CHARS]})
                out.append(None)
                continue
            # The request's own wording, without the parent, for the validator's echo check.
            instructions = "\n".join(m["content"] for m in messages).replace(job.parent.prompt_text, "\n")
            clean, reason = self.validator.check(raw, job.parent.prompt_text, instructions)
            if clean is None:
                counts.rejected[reason or "unknown"] += 1
                outcomes.append(where | {"outcome": "rejected", "reason": reason or "unknown",
                                         "text": raw[:_EVENT_TEXT_CHARS]})
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
    def plan(self, parents: Sequence[PromptRecord], n_children: int) -> list[EvolveJob]:
        """Draw the operators of ``n_children`` requests per parent, in parent order (advances the generator).

        :meth:`run_plan` makes the calls; planning first lets a caller record what is in flight before it is.
        """
        if n_children < 0:
            raise ValueError(f"n_children must be >= 0, got {n_children}")
        jobs: list[EvolveJob] = []
        next_index: Counter[str] = Counter()
        for parent in parents:
            for op in choose_operators(self.rng, n_children, self.operators):
                jobs.append(EvolveJob(parent, op, next_index[parent.id]))
                next_index[parent.id] += 1
        return jobs

    async def run_plan(self, jobs: Sequence[EvolveJob], *, step: int) -> EvolveBatch:
        """Make the requests of a :meth:`plan`; the children in job order."""
        counts, outcomes = EvolveCounts(), []
        results = await self._attempt(jobs, step, counts, outcomes)
        return EvolveBatch(children=[c for c in results if c is not None], counts=counts, outcomes=outcomes)

    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        """Up to ``n_children`` validated children per parent, in parent order.

        A child's id is ``child_id(parent.id, step, k)`` for its attempt number ``k``, so ids stay stable when
        siblings are rejected. A parent listed twice gets distinct attempt numbers; evolving the same parent again
        in another call at the same ``step`` would reuse ids, which the caller must avoid.
        """
        return await self.run_plan(self.plan(parents, n_children), step=step)

    # --- tree best-of-N ---------------------------------------------------------------------------------------------
    async def _score(self, scorer: Scorer, text: str) -> float:
        async with self.caller.semaphore():  # a scorer is often an LLM judge: same concurrency budget
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
        counts, outcomes = EvolveCounts(), []
        chain: list[PromptRecord] = []
        node = parent
        for level in range(1, depth + 1):
            ops = choose_operators(self.rng, width, self.operators)
            jobs = [EvolveJob(node, op, i) for i, op in enumerate(ops)]
            valid = [c for c in await self._attempt(jobs, step, counts, outcomes) if c is not None]
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
        return EvolveBatch(children=chain, counts=counts, outcomes=outcomes)


class TreeBoNEvolver(PromptEvolver):
    """Tree best-of-N as an evolve method: each parent grows one chain of winners (:meth:`Evolver.evolve_tree_bon`).

    ``n_children`` is not used: a parent gets at most ``depth`` children, one per level. Levels draw their operators
    as they go, so nothing is planned ahead; the state is the wrapped evolver's generator.
    """

    def __init__(self, evolver: Evolver, *, scorer: Scorer, width: int, depth: int) -> None:
        self.evolver, self.scorer, self.width, self.depth = evolver, scorer, width, depth
        self.rng = evolver.rng

    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        chains = await asyncio.gather(*(self.evolver.evolve_tree_bon(
            p, width=self.width, depth=self.depth, scorer=self.scorer, step=step) for p in parents))
        counts = EvolveCounts()
        for chain in chains:
            counts.add(chain.counts)
        return EvolveBatch(children=[c for chain in chains for c in chain.children], counts=counts,
                           outcomes=[o for chain in chains for o in chain.outcomes])


class _NonFiniteScore(ValueError):
    """A scorer returned NaN or infinity, which would make the arg-max meaningless."""
