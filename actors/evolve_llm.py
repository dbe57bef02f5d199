"""The creator's evolve LLM, reached through ``litellm.acompletion``.

:class:`EvolveLLM` opens it once (``connect()`` returns the evolver's ``complete(messages) -> str``) and counts the
calls. With ``evolve.local_model_path`` set, an in-process LiteLLM provider (:mod:`actors.local_llm`) serves a
local Hugging Face model instead of a remote API (no network needed). A model LiteLLM cannot route in this process
is an :class:`EvolveLLMError` at start-up; retries, timeouts and failure causes are the evolver's
(:mod:`eva_ray.evolve.evolver`).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

from eva_ray.config import EvolveConfig
from eva_ray.evolve.evolver import Complete

_PROVIDER_COUNTERS = ("calls", "completed", "failed", "timeouts", "bad_requests", "errors", "cancelled",
                      "prompt_tokens", "completion_tokens", "batches", "requests_batched")


class EvolveLLMError(RuntimeError):
    """The evolve LLM cannot be used as configured (unknown provider or model, refused key or request)."""


def check_litellm_model(cfg: EvolveConfig) -> None:
    """One clear error, at start-up, when LiteLLM cannot route ``evolve.model`` in this process.

    Otherwise every evolve call of the run fails with the same ``BadRequestError`` while the run goes on having
    evolved nothing. A custom provider (``evolve.local_model_path``) must be registered before this check.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    quiet, litellm.suppress_debug_info = litellm.suppress_debug_info, True  # no "Provider List" banner
    try:
        litellm.get_llm_provider(model=cfg.model, api_base=cfg.api_base)
    except Exception as exc:  # noqa: BLE001 - LiteLLM raises BadRequestError (and others) for an unroutable model
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise EvolveLLMError(
            f"evolve.model {cfg.model!r}: LiteLLM cannot route it in the creator's process "
            f"({lines[0] if lines else type(exc).__name__}); name a provider LiteLLM knows (openai/..., "
            "gemini/..., ...) or set evolve.local_model_path to serve a local model as <provider>/<name>") from None
    finally:
        litellm.suppress_debug_info = quiet


def litellm_complete(cfg: EvolveConfig, counters: Counter) -> Complete:
    """Bind LiteLLM to the evolver's ``complete(messages) -> str``: one attempt, bounded by ``evolve.timeout_s``.

    The evolver retries and counts (by cause); LiteLLM's own ``num_retries`` is not used: in LiteLLM 1.110 it
    retries every ``APIError`` alike (bad requests included), reports the first error rather than the last and
    counts nothing. The API key is read from the environment variable the config names, so it never sits in a
    config file, a log or a checkpoint.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of the price table
    import litellm

    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise RuntimeError(f"evolve.api_key_env names {cfg.api_key_env!r}, which is not set in the environment")

    async def complete(messages: list[dict[str, str]]) -> str:
        response = await litellm.acompletion(
            model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            timeout=cfg.timeout_s, api_base=cfg.api_base, api_key=api_key, num_retries=0,
        )
        counters["calls"] += 1
        return response.choices[0].message.content or ""

    return complete


class EvolveLLM:
    """The evolve LLM of one creator: opened on demand (only LLM evolve methods call :meth:`connect`)."""

    def __init__(self, cfg: EvolveConfig) -> None:
        self.cfg = cfg
        self.counters: Counter = Counter()  # calls answered; part of the creator's checkpoint
        self.local_provider = None
        self._provider_baseline: dict[str, Any] = {}
        self._opened = False

    def connect(self, *, max_tokens: int | None = None) -> Complete:
        """The ``complete`` of the evolve LLM; ``max_tokens`` replaces ``evolve.max_tokens`` in this binding (the
        rewriter writes whole responses, not prompts). The provider is opened and checked on the first call only;
        every binding counts into :attr:`counters`."""
        cfg = self.cfg
        if not self._opened:
            if cfg.local_model_path:
                from actors.local_llm import register_local_provider

                # Load now: a lazy load would make the first evolve call take seconds while warm-up flies by.
                self.local_provider = register_local_provider(cfg.local_model_path, load_now=True,
                                                              provider=cfg.model.split("/", 1)[0])
                # A provider may be reused across runs in one process; count only this creator's calls.
                self._provider_baseline = self.local_provider.stats()
            if not cfg.model:
                raise ValueError("evolve.model is empty: name the LiteLLM model that evolves prompts")
            check_litellm_model(cfg)
            self._opened = True
        if max_tokens is not None:
            cfg = dataclasses.replace(cfg, max_tokens=max_tokens)
        return litellm_complete(cfg, self.counters)

    def provider_stats(self) -> dict[str, Any]:
        """The local provider's counters since :meth:`connect` ({} when evolving uses a remote API)."""
        if self.local_provider is None:
            return {}
        now = self.local_provider.stats()
        return {k: (v - self._provider_baseline.get(k, 0) if k in _PROVIDER_COUNTERS else v) for k, v in now.items()}

    def close(self) -> None:
        if self.local_provider is not None:
            # Stop the provider's generation thread before the process exits: a thread still inside generate at
            # interpreter exit aborts the process (exit 134) after the run itself succeeded.
            self.local_provider.close()
