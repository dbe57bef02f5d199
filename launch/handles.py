"""One calling convention for actors, whether they live in Ray or in this process.

The driver never calls ``ray`` directly. It holds :class:`ActorHandle` objects and writes

    futures = [worker.call("generate", shard, n) for worker, shard in zip(workers, shards)]
    results = gather(futures)

which means ``handle.generate.remote(...)`` + ``ray.get`` for a Ray actor, and a direct call for an inline actor. An
inline actor whose methods are coroutines (the creator) gets an event loop of its own on a background thread, so its
evolve tasks keep running between driver calls, as they do in a Ray async actor. Methods marked ``@collective``
(they block until a peer actor joins them: the weight channel) run on a thread of the inline actor's own, so the
driver can start the peer's call next, as it would with Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from typing import Any, Protocol


class ActorHandle(Protocol):
    name: str

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``method`` and return a future-like object for :func:`gather`."""

    def shutdown(self) -> None:
        """End the actor (and free what it holds)."""


class InlineActor:
    """A plain object driven in this process."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj = obj
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._collectives: concurrent.futures.ThreadPoolExecutor | None = None

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.name}-loop", daemon=True)
            self._thread.start()
        return self._loop

    def call(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fn = getattr(self.obj, method)
        if inspect.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._event_loop())
        if getattr(fn, "__eva_collective__", False):
            if self._collectives is None:  # one thread: an actor's collectives run in order, as in a Ray actor
                self._collectives = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.name)
            return self._collectives.submit(fn, *args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # surfaced by gather(), like a failed Ray task
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        close = getattr(self.obj, "close", None)
        if close is not None:
            gather([self.call("close")])
        if self._collectives is not None:
            self._collectives.shutdown(wait=False)
        if self._loop is not None:
            # Background tasks that libraries started on this loop (LiteLLM's logging worker) end with it, quietly.
            asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class RayActor:
    """A Ray actor handle behind the same ``call`` as :class:`InlineActor`."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle = handle
        self.name = name

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.handle, method).remote(*args, **kwargs)

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.handle.close.remote(), timeout=60)
        except Exception:  # the actor may lack close() or be dead already; killing it is what matters
            pass
        ray.kill(self.handle)


def settle(futures: list[Any], timeout: float | None = None) -> list[tuple[bool, Any]]:
    """Wait for every future (inline or Ray), failures included: ``(True, result)`` or ``(False, exception)`` each.

    Unlike :func:`gather` it never stops at the first failure, so a caller can tell which actor failed first-hand
    (died) and which only failed because a peer did. A future still running after ``timeout`` seconds is reported
    as a ``TimeoutError``.
    """
    outcomes: list[tuple[bool, Any]] = []
    if futures and not isinstance(futures[0], concurrent.futures.Future):
        import ray

        ray.wait(list(futures), num_returns=len(futures), timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    for future in futures:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            outcomes.append((True, gather([future], timeout=left)[0]))
        except Exception as exc:  # GetTimeoutError, a Ray actor's death, the method's own error
            outcomes.append((False, exc))
    return outcomes


def is_actor_death(exc: BaseException) -> bool:
    """True when ``exc`` says the actor process itself is gone (Ray's ActorDiedError and relatives)."""
    return any(cls.__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
               for cls in type(exc).__mro__)


def gather(futures: list[Any], timeout: float | None = None) -> list[Any]:
    """Wait for every future (inline or Ray) and return their results in order; the first failure raises."""
    if not futures:
        return []
    if isinstance(futures[0], concurrent.futures.Future):
        return [f.result(timeout=timeout) for f in futures]
    import ray

    return ray.get(list(futures), timeout=timeout)
