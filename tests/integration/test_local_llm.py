"""A local HF model answers real ``litellm.acompletion`` calls through the in-process provider.

Every call here goes through LiteLLM's own entry points (``litellm.acompletion`` / ``litellm.completion``); the
provider's counters prove the requests reached it, and the exception tests pin the LiteLLM types the creator
catches to count failures by cause.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import openai
import pytest

from actors.local_llm import (
    LocalHFProvider,
    local_model_name,
    register_for_model,
    register_local_provider,
    unregister_local_provider,
)
import litellm  # after actors.local_llm, which sets LITELLM_LOCAL_MODEL_COST_MAP before LiteLLM is imported

from eva_ray.tiny import save_tiny_models

_names = itertools.count()


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    # initializer_range 0.1: at the default 0.02 the tied embeddings dominate and greedy decoding just repeats the
    # last prompt token (a special token, so the text is empty); 0.1 gives prompt-dependent visible characters,
    # which the determinism and batching tests need to mean anything.
    return save_tiny_models(tmp_path_factory.mktemp("tiny"), initializer_range=0.1)["policy"]


@pytest.fixture
def register(policy_path):
    """Register providers under fresh names; remove them from LiteLLM's process-wide map afterwards."""
    registered: list[str] = []

    def _register(**kwargs) -> tuple[str, LocalHFProvider]:
        provider = kwargs.pop("provider", f"localtest{next(_names)}")
        registered.append(provider)
        return provider, register_local_provider(kwargs.pop("path", policy_path), provider=provider, **kwargs)

    yield _register
    for provider in registered:
        unregister_local_provider(provider)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _delta(after: dict, before: dict, key: str) -> float:
    return after[key] - before[key]


def test_acompletion_returns_a_litellm_model_response(register):
    provider, handler = register()
    assert not handler.loaded  # lazy: the first call loads the model
    response = asyncio.run(litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hello"), max_tokens=12))
    assert isinstance(response, litellm.ModelResponse)
    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    # <|user|> + 5 characters + <|end|> + the <|assistant|> that opens the reply
    assert response.usage.prompt_tokens == 8
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    stats = handler.stats()
    assert handler.loaded and stats["calls"] == 1 and stats["completed"] == 1 and stats["failed"] == 0
    assert stats["prompt_tokens"] == 8 and stats["completion_tokens"] == response.usage.completion_tokens
    assert stats["mean_latency_s"] > 0


def test_sync_completion_is_served_too(register):
    provider, handler = register(load_now=True)
    assert handler.loaded
    response = litellm.completion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4, temperature=0)
    assert isinstance(response.choices[0].message.content, str)
    assert handler.stats()["completed"] == 1


def test_twenty_concurrent_calls_complete_in_shared_batches(register):
    provider, handler = register(max_batch=8)

    async def burst():
        return await asyncio.gather(*[
            litellm.acompletion(model=f"{provider}/tiny", messages=_chat(f"prompt number {i}"), max_tokens=6)
            for i in range(20)])

    start = time.perf_counter()
    responses = asyncio.run(burst())
    elapsed = time.perf_counter() - start
    assert len(responses) == 20
    assert all(isinstance(r.choices[0].message.content, str) for r in responses)
    stats = handler.stats()
    assert stats["calls"] == 20 and stats["completed"] == 20 and stats["failed"] == 0
    assert stats["completion_tokens"] == sum(r.usage.completion_tokens for r in responses)
    # The calls were concurrent, so the provider generated them several at a time, never more than max_batch.
    assert stats["requests_batched"] == 20 and stats["batches"] < 20 and 1 < stats["max_batch_seen"] <= 8
    print(f"20 concurrent calls: {elapsed:.2f}s in {stats['batches']} batches")


def test_max_tokens_is_respected(register):
    provider, _ = register()

    async def calls():
        return await asyncio.gather(*[
            litellm.acompletion(model=f"{provider}/tiny", messages=_chat(f"long answer {i}"), max_tokens=m,
                                temperature=1.0)
            for i, m in enumerate([1, 3, 7, 7, 20])])

    for response, limit in zip(asyncio.run(calls()), [1, 3, 7, 7, 20]):
        used = response.usage.completion_tokens
        assert 1 <= used <= limit
        # Rows share one batch run to 20 tokens; each is cut at its own limit ("length") or end of turn ("stop").
        finish = response.choices[0].finish_reason
        assert finish == ("stop" if used < limit else finish) and (finish != "length" or used == limit)
        assert len(response.choices[0].message.content) <= used  # one character per token at most


def test_temperature_zero_is_deterministic_alone_and_in_a_batch(register):
    provider, handler = register()
    prompts = ["Rewrite this: 2+2?", "hello", "a much longer prompt, to force left padding", "x"]

    async def one(text: str) -> str:
        response = await litellm.acompletion(model=f"{provider}/tiny", messages=_chat(text), max_tokens=12,
                                             temperature=0)
        return response.choices[0].message.content

    async def serial():
        return [await one(p) for p in prompts]

    async def together():
        return await asyncio.gather(*[one(p) for p in prompts])

    first, second = asyncio.run(serial()), asyncio.run(serial())
    assert first == second
    assert len(set(first)) > 1 and any(first)  # prompt-dependent, visible text: not a degenerate constant
    # Left padding and the attention mask must not change a row's greedy continuation.
    assert asyncio.run(together()) == first
    assert handler.stats()["max_batch_seen"] > 1

    async def sampled():
        return await asyncio.gather(*[
            litellm.acompletion(model=f"{provider}/tiny", messages=_chat(prompts[0]), max_tokens=12,
                                temperature=1.0) for _ in range(4)])

    texts = [r.choices[0].message.content for r in asyncio.run(sampled())]
    assert len(set(texts)) > 1  # temperature is honoured: sampling varies where greedy does not


def test_event_loop_keeps_running_during_generation(register):
    provider, handler = register(load_now=True)
    real_generate = handler.model.generate

    def long_generate(*args, **kwargs):
        # A random model may end its turn after a few tokens; the sleep guarantees a long call, and the real
        # generate after it still competes with the loop for the GIL.
        time.sleep(0.6)
        return real_generate(*args, **kwargs)

    handler.model.generate = long_generate
    gaps: list[float] = []

    async def heartbeat(stop: asyncio.Event):
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        beat = asyncio.create_task(heartbeat(stop))
        start = time.perf_counter()
        await litellm.acompletion(model=f"{provider}/tiny", messages=_chat("go"), max_tokens=64,
                                  temperature=1.0)
        took = time.perf_counter() - start
        stop.set()
        await beat
        return took

    took = asyncio.run(main())
    # Were generation run on the loop, one gap would last the whole call.
    assert took >= 0.6 and len(gaps) > 10 and max(gaps) < took / 2, (took, max(gaps))


def test_generation_error_surfaces_as_internal_server_error(register):
    provider, handler = register(load_now=True)
    real_generate = handler.model.generate

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    handler.model.generate = broken
    with pytest.raises(litellm.InternalServerError) as info:
        asyncio.run(litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4))
    assert info.value.status_code == 500 and "out of memory" in str(info.value)
    assert isinstance(info.value, openai.APIError)  # LiteLLM's exceptions share this base (litellm.APIError is not it)
    stats = handler.stats()
    assert stats["failed"] == 1 and stats["errors"] == 1 and stats["completed"] == 0

    # The generation thread survives a failed batch: the next call is served.
    handler.model.generate = real_generate
    response = asyncio.run(litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4))
    assert isinstance(response.choices[0].message.content, str) and handler.stats()["completed"] == 1


def test_timeout_is_enforced_and_surfaces_as_litellm_timeout(register):
    provider, handler = register(load_now=True)
    real_generate = handler.model.generate

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real_generate(*args, **kwargs)

    handler.model.generate = slow

    async def call():
        start = time.perf_counter()
        with pytest.raises(litellm.Timeout) as info:
            await litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4, timeout=0.2)
        return time.perf_counter() - start, info.value

    took, error = asyncio.run(call())
    assert error.status_code == 408
    assert took < 0.9  # LiteLLM does not enforce timeouts for custom providers; the provider must
    stats = handler.stats()
    assert stats["failed"] == 1 and stats["timeouts"] == 1 and stats["errors"] == 0

    with pytest.raises(litellm.Timeout):  # the sync path enforces it too
        litellm.completion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4, timeout=0.2)
    assert handler.stats()["timeouts"] == 2


def test_a_cancelled_caller_drops_its_queued_request(register):
    provider, handler = register(load_now=True, max_batch=1)
    real_generate = handler.model.generate
    release = threading.Event()

    def gated(*args, **kwargs):
        release.wait(10)
        return real_generate(*args, **kwargs)

    handler.model.generate = gated

    async def main():
        call = lambda: litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=2)  # noqa: E731
        busy = asyncio.create_task(call())
        while handler.stats()["calls"] < 1:  # the first call is generating (and blocked)
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(call())
        while handler.stats()["calls"] < 2:  # the second waits in the queue behind it
            await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        return await busy

    assert isinstance(asyncio.run(main()).choices[0].message.content, str)
    stats = handler.stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["failed"] == 0
    assert stats["requests_batched"] == 1  # the cancelled request was never generated


def test_bad_requests_are_refused_with_distinct_types(register):
    provider, handler = register(name="tiny")
    with pytest.raises(litellm.NotFoundError):
        asyncio.run(litellm.acompletion(model=f"{provider}/other", messages=_chat("hi"), max_tokens=4))
    with pytest.raises(litellm.BadRequestError):
        asyncio.run(litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=4, n=2))
    stats = handler.stats()
    assert stats["calls"] == 2 and stats["failed"] == 2 and stats["bad_requests"] == 2
    assert not handler.loaded  # refused before any model work


def test_registering_again_replaces_instead_of_duplicating(register, policy_path):
    provider, first = register(max_batch=4)
    _, same = register(provider=provider, max_batch=4)
    assert same is first  # identical settings: the loaded provider (and its counters) is kept
    _, second = register(provider=provider, max_batch=2)
    assert second is not first
    entries = [item for item in litellm.custom_provider_map if item["provider"] == provider]
    assert len(entries) == 1 and entries[0]["custom_handler"] is second

    asyncio.run(litellm.acompletion(model=f"{provider}/tiny", messages=_chat("hi"), max_tokens=2))
    assert second.stats()["calls"] == 1 and first.stats()["calls"] == 0

    assert unregister_local_provider(provider)
    assert not any(item["provider"] == provider for item in litellm.custom_provider_map)
    with pytest.raises(ValueError, match="built-in"):
        register_local_provider(policy_path, provider="openai")


def test_model_strings_resolve_to_a_registered_folder(policy_path):
    assert local_model_name("gemini/gemini-1.5-pro") is None
    assert local_model_name("local/smollm2") == "smollm2"
    assert register_for_model("gemini/gemini-1.5-pro", {"smollm2": policy_path}) is None
    with pytest.raises(ValueError, match="known: smollm2"):
        register_for_model("local/other", {"smollm2": policy_path})
    try:
        handler = register_for_model("local/smollm2", {"smollm2": policy_path}, max_batch=2)
        assert handler.model_path == policy_path and handler.name == "smollm2"
        response = asyncio.run(litellm.acompletion(model="local/smollm2", messages=_chat("hi"), max_tokens=3))
        assert response.usage.completion_tokens <= 3 and handler.stats()["completed"] == 1
    finally:
        unregister_local_provider("local")
