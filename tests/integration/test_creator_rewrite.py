"""``Creator.rewrite``, the offline rewriter on the creator actor (inline): real ``litellm.acompletion`` calls
answered by a tiny local model through the in-process provider, and a fake ``complete`` with bad answers."""

from __future__ import annotations

import asyncio

import pytest

from actors.creator import Creator
from eva_ray.config import load_config
from eva_ray.records import PromptRecord
from eva_ray.tiny import save_tiny_models


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    # initializer_range 0.1: the tiny model then writes visible characters (at 0.02 it ends its turn at once).
    return save_tiny_models(tmp_path_factory.mktemp("tiny"), initializer_range=0.1)["policy"]


def make_creator(*extra: str, complete=None, policy: str | None = None) -> Creator:
    local = [f"evolve.local_model_path={policy}"] if policy else []
    cfg = load_config(None, ["reward.function=pkg.mod:fn", "offline.rewrite=true", "evolve.model=local/tinyrewriter",
                             "evolve.method=none", "evolve.timeout_s=30", "evolve.temperature=0", *local, *extra])
    return Creator(cfg, [PromptRecord(id="seed-0", text="unused")], complete=complete)


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", text=f"Name a colour number {i}.") for i in range(n)]


@pytest.mark.slow
def test_rewrite_goes_through_litellm_to_the_local_model_and_counts_every_answer(tiny_policy):
    # Loose bounds: whatever visible text the tiny model writes is a rewrite; the checks still run on it.
    creator = make_creator("offline.rewrite_min_ratio=0.05", "offline.rewrite_max_ratio=20",
                           "offline.rewrite_max_tokens=16", policy=tiny_policy)
    responses = [f"My colour {i} is a deep blue." for i in range(4)]

    async def go():
        loose = await creator.rewrite(prompts(4), responses)
        # Default bounds against long originals: 16 tokens (characters, here) cannot reach half their length.
        creator.cfg.offline.rewrite_min_ratio, creator.cfg.offline.rewrite_max_ratio = 0.5, 2.0
        creator._rewriter = None
        strict = await creator.rewrite(prompts(3), ["A long and careful answer about colours. " * 4] * 3)
        provider = await creator.provider_stats()
        await creator.close()
        return loose, strict, provider

    loose, strict, provider = asyncio.run(go())
    for out, n in ((loose, 4), (strict, 3)):
        c = out["counts"]
        assert c["requested"] == n == len(out["texts"])
        assert c["ok"] + sum(c["rejected"].values()) + sum(c["failed"].values()) == n
        assert not c["failed"]
    # Every request reached the local model through LiteLLM, bounded by offline.rewrite_max_tokens.
    assert provider["completed"] == 7 and creator.llm.counters["calls"] == 7
    assert provider["completion_tokens"] <= 7 * 16
    kept = [t for t in loose["texts"] if t is not None]
    assert kept and len(kept) == loose["counts"]["ok"] and all(0 < len(t) <= 16 for t in kept)
    assert strict["texts"] == [None] * 3 and strict["counts"]["ok"] == 0
    assert set(strict["counts"]["rejected"]) <= {"too_short", "empty"}
    assert creator.rewrite_counts.requested == 7


def test_bad_answers_and_failures_are_counted_and_give_none():
    calls = {"n": 0}

    async def complete(messages):
        calls["n"] += 1
        text = messages[-1]["content"]
        if "number 0" in text:
            return "A crisp, vivid shade of deep blue, as the sky at dusk."
        if "number 1" in text:
            return ""
        if "number 2" in text:
            return "blue " * 200
        if "number 3" in text:
            raise ConnectionError("provider down")
        raise RuntimeError("unexpected")

    creator = make_creator("evolve.max_retries=1", "evolve.retry_backoff_s=0", complete=complete)
    responses = ["My favourite colour is a deep blue, like the sea."] * 5
    out = asyncio.run(creator.rewrite(prompts(5), responses))
    asyncio.run(creator.close())
    assert out["texts"] == ["A crisp, vivid shade of deep blue, as the sky at dusk.", None, None, None, None]
    assert out["counts"] == {"requested": 5, "ok": 1, "rejected": {"empty": 1, "too_long": 1},
                             "failed": {"connection": 1, "RuntimeError": 1}, "retried": {"connection": 1}}
    assert calls["n"] == 6  # the connection error was tried twice (max_retries 1); nothing else was retried
