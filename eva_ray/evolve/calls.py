"""One LLM request under the creator's call policy: bounded concurrency, a timeout per attempt, retries with
backoff for passing causes, a deadline per request, and failures counted by cause.

Every caller of the evolve LLM goes through :class:`LLMCaller`: the evolver (one request per child) and the
rewriter of offline eva (one request per chosen response, :mod:`eva_ray.rewrite`). ``complete`` is an async
callable from chat messages to the answer text: the creator actor binds LiteLLM to it, tests bind a fake, so this
module imports no LLM client.

A request whose call fails for a passing reason (rate limit, timeout, connection, server error) is tried again,
with exponential backoff, by tenacity: at most ``max_retries`` more times, each attempt bounded by ``timeout_s`` and
the whole request (attempts and waits) by ``deadline_s``. Retries are counted by the cause that made them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from eva_ray.config import EvolveConfig

Complete = Callable[[list[dict[str, str]]], Awaitable[str]]
"""An LLM call: chat messages in, the assistant's answer text out."""

# Why an LLM call failed, by exception class name, looked up along the class's MRO so that a provider library's
# subclasses (LiteLLM's, the OpenAI client's) land on their base cause. Names, not classes: this package imports no
# LLM client.
_CAUSE_BY_CLASS = {
    "RateLimitError": "rate_limit",
    "Timeout": "timeout", "APITimeoutError": "timeout", "TimeoutError": "timeout",
    "APIConnectionError": "connection", "ConnectionError": "connection",
    "ContextWindowExceededError": "context_window", "ContentPolicyViolationError": "content_policy",
    "BadRequestError": "bad_request", "UnprocessableEntityError": "bad_request",
    "AuthenticationError": "auth", "PermissionDeniedError": "auth",
    "NotFoundError": "not_found",
    "InternalServerError": "server_error", "ServiceUnavailableError": "server_error", "BadGatewayError": "server_error",
    "BadAnswer": "bad_answer",
}
_CAUSE_BY_STATUS = {400: "bad_request", 401: "auth", 403: "auth", 404: "not_found", 408: "timeout",
                    422: "bad_request", 429: "rate_limit"}
RETRYABLE_CAUSES = frozenset({"rate_limit", "timeout", "connection", "server_error"})
"""Causes that pass: the provider is overloaded, slow or briefly unreachable. Any other fails the same way again."""
CONFIG_CAUSES = frozenset({"bad_request", "auth", "not_found"})
"""Causes that, when every call fails with them, say the evolve LLM is misconfigured (model, provider, key)."""
_MAX_BACKOFF_S = 30.0


def failure_cause(exc: BaseException) -> str:
    """The cause of a failed LLM call, e.g. ``rate_limit`` or ``timeout``; an unknown exception's type name."""
    for klass in type(exc).__mro__:
        cause = _CAUSE_BY_CLASS.get(klass.__name__)
        if cause is not None:
            return cause
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status in _CAUSE_BY_STATUS:
            return _CAUSE_BY_STATUS[status]
        if status >= 500:
            return "server_error"
    return type(exc).__name__


class BadAnswer(TypeError):
    """``complete()`` returned something other than text."""


class CallCounts(Protocol):
    """What a request adds to: the counts of its caller (:class:`~eva_ray.evolve.evolver.EvolveCounts`)."""

    failed: Counter[str]
    retried: Counter[str]
    latencies_s: list[float]


class LLMCaller:
    """Makes requests through ``complete`` under the policy in the module docstring.

    ``max_concurrency`` requests are in flight at once per event loop (the semaphore is held over a request's
    retries too: a rate-limited provider gets no more calls at once).
    """

    def __init__(self, complete: Complete, *, max_concurrency: int = 8, timeout_s: float | None = None,
                 deadline_s: float | None = None, max_retries: int = 0, retry_backoff_s: float = 1.0) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        for name, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_retries < 0 or retry_backoff_s < 0:
            raise ValueError(f"max_retries and retry_backoff_s must be >= 0, got {max_retries}, {retry_backoff_s}")
        self.complete = complete
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, complete: Complete, cfg: EvolveConfig) -> LLMCaller:
        """The policy of the ``evolve`` section: ``concurrency``, ``timeout_s``, ``deadline_s``, retries."""
        return cls(complete, max_concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, deadline_s=cfg.deadline_s,
                   max_retries=cfg.max_retries, retry_backoff_s=cfg.retry_backoff_s)

    def semaphore(self) -> asyncio.Semaphore:
        """The concurrency limit of the running event loop (others may share it, e.g. a tree-BoN scorer)."""
        # One semaphore per event loop: concurrent calls on the same loop share the limit, and a caller reused under
        # a fresh loop (asyncio.run in tests, a restarted actor) does not touch a dead loop's primitive.
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._sem

    async def call(self, messages: list[dict[str, str]], counts: CallCounts) -> str | BaseException:
        """One request, retried for passing causes; the answer, or the exception of its last attempt (counted in
        ``counts.failed`` by cause). Never raises for what the provider does."""
        # Imported here, not at module level: eva_ray.config imports this package, and the learner and rollout
        # worker must import where tenacity is absent (the GPU machine of scripts/gpu_check.py).
        from tenacity import (AsyncRetrying, retry_if_exception, stop_after_attempt, stop_before_delay,
                              wait_exponential_jitter)

        async with self.semaphore():
            stop = stop_after_attempt(self.max_retries + 1)
            if self.deadline_s is not None:
                stop = stop | stop_before_delay(self.deadline_s)
            deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s

            def count_retry(state: Any) -> None:
                counts.retried[failure_cause(state.outcome.exception())] += 1

            retrying = AsyncRetrying(
                stop=stop, reraise=True, before_sleep=count_retry,
                wait=wait_exponential_jitter(multiplier=self.retry_backoff_s, max=_MAX_BACKOFF_S,
                                             jitter=self.retry_backoff_s),
                retry=retry_if_exception(lambda exc: failure_cause(exc) in RETRYABLE_CAUSES),
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        raw = await self._call_once(messages, deadline, counts)
            except Exception as exc:  # noqa: BLE001 - any provider error is one failed request, not a dead batch
                counts.failed[failure_cause(exc)] += 1
                return exc
        return raw

    async def _call_once(self, messages: list[dict[str, str]], deadline: float | None, counts: CallCounts) -> str:
        """One attempt, bounded by ``timeout_s`` and by what is left of the request's deadline."""
        limits = [t for t in (self.timeout_s, None if deadline is None else deadline - time.monotonic())
                  if t is not None]
        t0 = time.perf_counter()
        try:
            if limits:
                raw = await asyncio.wait_for(self.complete(messages), max(min(limits), 0.0))
            else:
                raw = await self.complete(messages)
        finally:
            counts.latencies_s.append(time.perf_counter() - t0)
        if not isinstance(raw, str):
            raise BadAnswer(f"complete() returned {type(raw).__name__}, expected str")
        return raw
