"""The async evolver and tree-BoN, driven by fake ``complete`` callables (the LLM is not under test)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Callable

import pytest

from eva_ray.evolve.evolver import EvolveBatch, Evolver
from eva_ray.evolve.operators import IN_DEPTH, INPUT_MARKER, OPERATORS, OUTPUT_MARKER
from eva_ray.evolve.validate import (
    DUPLICATE_IN_BUFFER,
    ECHOED_INSTRUCTION,
    ECHOED_MARKER,
    EMPTY,
    NEAR_DUPLICATE_PARENT,
    TOO_LONG,
    EvolveValidator,
)
from eva_ray.records import PromptRecord, child_id

_VOCAB = [f"w{i}x{(i * 7919) % 1000}" for i in range(2000)]


def parent_of(messages: list[dict[str, str]]) -> str:
    user = messages[-1]["content"]
    return user.split(INPUT_MARKER + "\n", 1)[1].rsplit("\n\n" + OUTPUT_MARKER, 1)[0]


def operator_of(messages: list[dict[str, str]]) -> str:
    user = messages[-1]["content"]
    return next(name for name, op in OPERATORS.items() if op.instruction in user)


def words_from(key: str, n: int = 25) -> str:
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    return " ".join(rng.choice(_VOCAB) for _ in range(n)) + "?"


class FakeLLM:
    """Answers every call with fresh, distinct text; ``script`` maps an operator to a special behaviour.

    Tracks how many calls are in flight at once, and every answer it gave per parent.
    """

    def __init__(self, script: dict[str, Callable[[str], str]] | None = None, delay: float = 0.0) -> None:
        self.script = script or {}
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.answers: dict[str, list[str]] = {}

    async def __call__(self, messages: list[dict[str, str]]) -> str:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = self.calls
            self.calls += 1
            await asyncio.sleep(self.delay)
            parent, op = parent_of(messages), operator_of(messages)
            answer = self.script[op](parent) if op in self.script else words_from(f"{parent}|{op}|{n}")
            self.answers.setdefault(parent, []).append(answer)
            return answer
        finally:
            self.in_flight -= 1


def seeds(k: int = 3) -> list[PromptRecord]:
    return [PromptRecord(id=f"seed-{i}", text=words_from(f"seed{i}"), info=0.5 + i) for i in range(k)]


def run(coro):
    return asyncio.run(coro)


def assert_counts_add_up(batch: EvolveBatch) -> None:
    c = batch.counts
    assert c.ok + c.n_rejected + c.n_failed == c.requested
    assert len(c.latencies_s) == c.ok + c.n_rejected + c.n_failed + c.n_retried  # every attempt made is timed


def test_children_carry_lineage() -> None:
    parents = seeds(3)
    parents[1].generation = 2
    ev = Evolver(FakeLLM(), rng_seed=1)
    batch = run(ev.evolve(parents, 4, step=7))
    assert len(batch.children) == 12 and batch.counts.ok == 12
    by_parent = Counter(c.parent_id for c in batch.children)
    assert by_parent == {p.id: 4 for p in parents}
    for p in parents:
        kids = [c for c in batch.children if c.parent_id == p.id]
        assert [c.id for c in kids] == [child_id(p.id, 7, k) for k in range(4)]
        for c in kids:
            assert c.source == "evolved" and c.generation == p.generation + 1 and c.step_born == 7
            assert c.info == p.info and not c.info_measured
            assert c.operator in ev.operators and c.text and c.text != p.text
            assert c.meta["evolve_style"] == "eva"
    assert_counts_add_up(batch)


def test_same_seed_same_children_different_seed_different_operators() -> None:
    def once(seed: int) -> list[tuple[str, str | None, str | None]]:
        batch = run(Evolver(FakeLLM(), rng_seed=seed).evolve(seeds(3), 5, step=1))
        return [(c.id, c.operator, c.text) for c in batch.children]

    assert once(11) == once(11)
    assert [op for _, op, _ in once(11)] != [op for _, op, _ in once(12)]


def test_operators_restricted_and_validated() -> None:
    ev = Evolver(FakeLLM(), operators=["reasoning", "constraints"])
    batch = run(ev.evolve(seeds(2), 10, step=0))
    assert {c.operator for c in batch.children} <= {"reasoning", "constraints"}
    assert Evolver(FakeLLM(), style="evol_quality").operators == ("evol_quality",)
    with pytest.raises(ValueError, match="allowed"):
        Evolver(FakeLLM(), style="evol_quality", operators=["persona"])
    with pytest.raises(ValueError, match="unknown evolve style"):
        Evolver(FakeLLM(), style="nope")


def test_rejections_by_reason_and_failures_by_exception_type() -> None:
    class ProviderDown(RuntimeError):
        pass

    def boom(_: str) -> str:
        raise ProviderDown("503")

    script = {
        "constraints": lambda p: "",  # empty
        "deepening": lambda p: f"{INPUT_MARKER}\n{p}",  # the model echoed the template
        "concretizing": lambda p: "long " * 2000,  # far too long
        "reasoning": lambda p: p.upper() + "!",  # parent, restated
        "expansion": boom,
    }
    ev = Evolver(FakeLLM(script), operators=IN_DEPTH, rng_seed=0)
    batch = run(ev.evolve(seeds(4), 10, step=3))
    c = batch.counts
    assert c.requested == 40 and c.ok == 0 and batch.children == []
    assert set(c.rejected) == {EMPTY, ECHOED_MARKER, TOO_LONG, NEAR_DUPLICATE_PARENT}
    assert dict(c.failed) == {"ProviderDown": c.n_failed} and c.n_failed > 0
    assert_counts_add_up(batch)
    assert ev.validator.rejections == c.rejected  # the validator's own counter agrees


def test_a_child_that_parrots_its_operator_instruction_is_rejected() -> None:
    # Seen with SmolLM2-135M: the "reasoning" request answered with its own method text, lightly reworded.
    script = {"reasoning": lambda p: OPERATORS["reasoning"].instruction.replace(".", "") + " about the sea"}
    ev = Evolver(FakeLLM(script), operators=["reasoning", "concretizing"], rng_seed=0)
    batch = run(ev.evolve(seeds(3), 6, step=1))
    c = batch.counts
    assert c.rejected[ECHOED_INSTRUCTION] > 0 and c.ok > 0  # the other operator's children are fine
    assert all(child.operator == "concretizing" for child in batch.children)
    assert_counts_add_up(batch)


def test_a_raising_complete_does_not_kill_the_batch() -> None:
    llm = FakeLLM()

    async def flaky(messages: list[dict[str, str]]) -> str:
        n = llm.calls
        if n % 3 == 0:
            llm.calls += 1
            raise (TimeoutError if n % 2 else ValueError)("flaky")
        return await llm(messages)

    batch = run(Evolver(flaky, rng_seed=0).evolve(seeds(3), 4, step=0))
    assert batch.counts.requested == 12
    assert batch.counts.n_failed == 4 and set(batch.counts.failed) == {"ValueError", "timeout"}
    assert len(batch.children) == batch.counts.ok == 8
    assert_counts_add_up(batch)


def test_timeout_and_non_string_answers_count_as_failures() -> None:
    async def hangs(messages: list[dict[str, str]]) -> str:
        await asyncio.sleep(10)
        return "never"

    async def returns_none(messages: list[dict[str, str]]) -> str:
        return None  # type: ignore[return-value]

    batch = run(Evolver(hangs, timeout_s=0.01).evolve(seeds(1), 3, step=0))
    assert dict(batch.counts.failed) == {"timeout": 3}
    batch = run(Evolver(returns_none).evolve(seeds(1), 2, step=0))
    assert dict(batch.counts.failed) == {"bad_answer": 2}
    assert [o["cause"] for o in batch.outcomes] == ["bad_answer", "bad_answer"]


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_is_respected(limit: int) -> None:
    llm = FakeLLM(delay=0.002)
    batch = run(Evolver(llm, max_concurrency=limit).evolve(seeds(4), 3, step=0))
    assert llm.calls == 12 and batch.counts.ok == 12
    assert llm.max_in_flight == limit  # reached, never exceeded


def test_duplicate_siblings_are_rejected_and_accepted_children_registered() -> None:
    same = {op: (lambda p: "One fixed answer for every call, whatever the parent.") for op in IN_DEPTH}
    validator = EvolveValidator()
    ev = Evolver(FakeLLM(same), operators=IN_DEPTH, validator=validator)
    batch = run(ev.evolve(seeds(2), 3, step=0))
    assert batch.counts.ok == 1 and batch.counts.rejected == {DUPLICATE_IN_BUFFER: 5}
    assert batch.children[0].id == child_id("seed-0", 0, 0)  # the first in parent order wins, not the fastest
    assert batch.children[0].text in validator.index
    # And the next batch is deduplicated against what the first one accepted.
    again = run(ev.evolve(seeds(1), 1, step=1))
    assert again.counts.rejected == {DUPLICATE_IN_BUFFER: 1}


def test_chat_parent_is_evolved_from_its_last_user_turn() -> None:
    chat = PromptRecord(
        id="seed-chat",
        messages=[
            {"role": "user", "content": "first question about rivers"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "follow-up: how do deltas form, and why do some grow while others shrink?"},
        ],
    )
    llm = FakeLLM()
    batch = run(Evolver(llm).evolve([chat], 2, step=0))
    assert set(llm.answers) == {chat.messages[-1]["content"]} and len(batch.children) == 2


# --- tree-BoN ------------------------------------------------------------------------------------------------------
def score_of(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) / 0xFFFFFF


@pytest.mark.parametrize("async_scorer", [False, True])
def test_tree_bon_keeps_the_best_child_each_level(async_scorer: bool) -> None:
    async def ascore(text: str) -> float:
        await asyncio.sleep(0)
        return score_of(text)

    root = seeds(1)[0]
    llm = FakeLLM()
    validator = EvolveValidator()
    ev = Evolver(llm, validator=validator, rng_seed=5)
    batch = run(ev.evolve_tree_bon(root, width=4, depth=3, scorer=ascore if async_scorer else score_of, step=9))
    chain = batch.children
    assert [c.generation for c in chain] == [1, 2, 3]
    assert [c.parent_id for c in chain] == [root.id, chain[0].id, chain[1].id]
    assert all(c.step_born == 9 and c.info == root.info for c in chain)
    node = root
    for level, child in enumerate(chain, start=1):
        candidates = llm.answers[node.text]
        assert len(candidates) == 4
        assert child.text == max(candidates, key=score_of)
        assert child.meta["tree_bon_score"] == score_of(child.text) and child.meta["tree_bon_level"] == level
        node = child
    assert batch.counts.requested == 12 and batch.counts.ok == 12
    # Only the winners stay in the duplicate index: the losers never reach the buffer.
    assert len(validator.index) == 3 and all(c.text in validator.index for c in chain)


def test_tree_bon_skips_failed_scores_and_stops_when_a_level_has_no_valid_child() -> None:
    root = seeds(1)[0]
    level = {"n": 0}

    async def complete(messages: list[dict[str, str]]) -> str:
        level["n"] += 1
        if level["n"] > 4:  # second level: every answer is empty
            return ""
        return words_from(f"cand{level['n']}")

    def picky(text: str) -> float:
        if text == words_from("cand1"):
            raise ZeroDivisionError("judge crashed")
        if text == words_from("cand2"):
            return float("nan")
        return 1.0 if text == words_from("cand3") else 0.5

    batch = run(Evolver(complete).evolve_tree_bon(root, width=4, depth=3, scorer=picky, step=0))
    assert [c.text for c in batch.children] == [words_from("cand3")]
    assert dict(batch.counts.score_failed) == {"ZeroDivisionError": 1, "non_finite": 1}
    assert batch.counts.requested == 8 and batch.counts.rejected == {EMPTY: 4}
    assert_counts_add_up(batch)


def test_tree_bon_validates_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        run(Evolver(FakeLLM()).evolve_tree_bon(seeds(1)[0], width=0, depth=2, scorer=len, step=0))


class RateLimitError(Exception):
    """Named like LiteLLM's: the cause is read from the class name along the MRO."""


class ProviderRefused(Exception):
    status_code = 400


def test_failures_are_counted_by_cause_and_only_passing_causes_are_retried() -> None:
    llm = FakeLLM()
    attempts: Counter[str] = Counter()

    async def flaky(messages: list[dict[str, str]]) -> str:
        key = parent_of(messages) + operator_of(messages)
        attempts[key] += 1
        if parent_of(messages) == seeds(2)[1].text:
            raise ProviderRefused("bad request")  # the same every time: never retried
        if attempts[key] <= 2:
            raise RateLimitError("slow down")  # twice per request, then fine
        return await llm(messages)

    ev = Evolver(flaky, rng_seed=0, max_retries=3, retry_backoff_s=0.0)
    batch = run(ev.evolve(seeds(2), 3, step=0))
    c = batch.counts
    assert c.ok == 3 and len(batch.children) == 3
    assert dict(c.failed) == {"bad_request": 3} and dict(c.retried) == {"rate_limit": 6}
    assert sum(attempts.values()) == 3 * 3 + 3  # 3 requests x 3 attempts, 3 refused requests x 1 attempt
    assert {o["outcome"] for o in batch.outcomes} == {"failed"} and len(batch.outcomes) == 3
    assert_counts_add_up(batch)
    # With no retries allowed, the same rate limit is a failure by its cause, not by an exception name.
    attempts.clear()
    batch = run(Evolver(flaky, rng_seed=0, max_retries=0).evolve(seeds(1), 2, step=0))
    assert dict(batch.counts.failed) == {"rate_limit": 2} and not batch.counts.retried


def test_each_attempt_has_its_own_timeout_and_the_request_a_deadline() -> None:
    import time

    calls = Counter()

    async def first_attempt_hangs(messages: list[dict[str, str]]) -> str:
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            await asyncio.sleep(10)
        return words_from(f"answer{calls['n']}")

    # A hung first attempt times out after timeout_s and the retry answers: the deadline is not eaten by it.
    batch = run(Evolver(first_attempt_hangs, max_concurrency=1, timeout_s=0.05, deadline_s=5, max_retries=2,
                        retry_backoff_s=0.0).evolve(seeds(1), 2, step=0))
    assert batch.counts.ok == 2 and dict(batch.counts.retried) == {"timeout": 2} and not batch.counts.failed

    async def always_hangs(messages: list[dict[str, str]]) -> str:
        calls["hang"] += 1
        await asyncio.sleep(10)
        return "never"

    t0 = time.monotonic()
    batch = run(Evolver(always_hangs, timeout_s=0.05, deadline_s=0.17, max_retries=50,
                        retry_backoff_s=0.0).evolve(seeds(1), 1, step=0))
    elapsed = time.monotonic() - t0
    # The deadline, not the 50 retries, ends the request: about 0.17 s, in 3-4 attempts (2 on a busy machine).
    assert dict(batch.counts.failed) == {"timeout": 1}
    assert 2 <= calls["hang"] <= 4 and elapsed < 1.0


def test_backoff_waits_between_attempts() -> None:
    import time

    calls = Counter()

    async def twice_down(messages: list[dict[str, str]]) -> str:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("reset")
        return words_from("fine")

    t0 = time.monotonic()
    batch = run(Evolver(twice_down, max_retries=2, retry_backoff_s=0.05).evolve(seeds(1), 1, step=0))
    assert batch.counts.ok == 1 and dict(batch.counts.retried) == {"connection": 2}
    assert time.monotonic() - t0 >= 0.05 + 0.10  # initial backoff, then doubled


def test_failure_cause_reads_class_names_along_the_mro_then_status_codes() -> None:
    from eva_ray.evolve.evolver import failure_cause

    class APIConnectionError(Exception):
        pass

    class Timeout(APIConnectionError):  # LiteLLM's Timeout is an APIConnectionError: the nearer name wins
        pass

    class Throttled(RateLimitError):
        pass

    class Status(Exception):
        def __init__(self, code: int) -> None:
            self.status_code = code

    assert failure_cause(Timeout()) == "timeout" and failure_cause(APIConnectionError()) == "connection"
    assert failure_cause(Throttled()) == "rate_limit" and failure_cause(asyncio.TimeoutError()) == "timeout"
    assert [failure_cause(Status(c)) for c in (401, 404, 429, 503, 418)] == \
        ["auth", "not_found", "rate_limit", "server_error", "Status"]
    assert failure_cause(ValueError()) == "ValueError"


def test_an_answer_of_template_markers_only_is_its_own_rejection() -> None:
    from eva_ray.evolve.validate import ONLY_MARKERS

    script = {op: (lambda p: f"{OUTPUT_MARKER}\n") for op in OPERATORS}
    script["reasoning"] = lambda p: "   "
    batch = run(Evolver(FakeLLM(script), operators=["reasoning", "deepening"], rng_seed=3).evolve(seeds(2), 4,
                                                                                                   step=0))
    assert set(batch.counts.rejected) == {ONLY_MARKERS, EMPTY}
    assert all(o["reason"] == ONLY_MARKERS for o in batch.outcomes if o["operator"] == "deepening")
