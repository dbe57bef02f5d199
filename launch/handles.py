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

_DEFAULT_TIMEOUT_S: list[float | None] = [None]
# "actor.method" of every call in flight, keyed by the call's future (inline) or its object id (Ray): a call that
# times out or whose actor died is reported by name. Keyed by id so no entry keeps a Ray result alive.
_LABELS: dict[Any, str] = {}


class ActorTimeout(TimeoutError):
    """A remote call did not answer within the driver's timeout (``run.call_timeout_s``): the actor is hung."""


def set_call_timeout(seconds: float | None) -> None:
    """The timeout :func:`gather` applies when its caller gives none (``None``: wait forever)."""
    _DEFAULT_TIMEOUT_S[0] = seconds


def call_timeout() -> float | None:
    return _DEFAULT_TIMEOUT_S[0]


def _key(future: Any) -> Any:
    return future if isinstance(future, concurrent.futures.Future) else future.hex()


def label_of(future: Any) -> str | None:
    """``actor.method`` of a call started through :meth:`ActorHandle.call`, if known."""
    return _LABELS.get(_key(future))


def _label(future: Any, name: str, method: str) -> Any:
    _LABELS[_key(future)] = f"{name}.{method}"
    return future


def _tag(exc: BaseException, label: str | None) -> BaseException:
    """Record which call failed on the exception (``eva_call``: ``actor.method``; ``eva_actor``: the actor)."""
    if label is not None and getattr(exc, "eva_call", None) is None:
        try:
            exc.eva_call = label  # type: ignore[attr-defined]
            exc.eva_actor = label.split(".", 1)[0]  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # an exception type that refuses attributes keeps its own message
            pass
    return exc


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
            return _label(asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._event_loop()),
                          self.name, method)
        if getattr(fn, "__eva_collective__", False):
            if self._collectives is None:  # one thread: an actor's collectives run in order, as in a Ray actor
                self._collectives = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.name)
            return _label(self._collectives.submit(fn, *args, **kwargs), self.name, method)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # surfaced by gather(), like a failed Ray task
            future.set_exception(_tag(exc, f"{self.name}.{method}"))
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
        return _label(getattr(self.handle, method).remote(*args, **kwargs), self.name, method)

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
    """Wait for every future (inline or Ray) and return their results in order; the first failure raises.

    ``timeout`` defaults to :func:`set_call_timeout`'s; a call still running after it raises :class:`ActorTimeout`
    naming the call. A failure carries ``eva_call`` / ``eva_actor`` (which call, which actor) when known.
    """
    if not futures:
        return []
    if timeout is None:
        timeout = call_timeout()
    labels = [label_of(f) for f in futures]
    try:
        if isinstance(futures[0], concurrent.futures.Future):
            return _gather_inline(futures, labels, timeout)
        return _gather_ray(futures, labels, timeout)
    finally:
        for future in futures:
            _LABELS.pop(_key(future), None)


def _gather_inline(futures: list[concurrent.futures.Future], labels: list[str | None],
                   timeout: float | None) -> list[Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for future, label in zip(futures, labels):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(future.result(timeout=left))
        except concurrent.futures.TimeoutError:
            raise ActorTimeout(f"{label or 'a call'} did not answer within {timeout:.0f}s (run.call_timeout_s): the "
                               "actor is hung or far slower than expected") from None
        except Exception as exc:
            raise _tag(exc, label)
    return out


def _gather_ray(futures: list[Any], labels: list[str | None], timeout: float | None) -> list[Any]:
    import ray

    refs = list(futures)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        late = ", ".join(sorted({labels[refs.index(r)] or "a call" for r in pending}))
        raise ActorTimeout(f"{late} did not answer within {timeout:.0f}s (run.call_timeout_s): the actor is hung or "
                           "far slower than expected")
    out = []
    for ref, label in zip(refs, labels):
        try:
            out.append(ray.get(ref))
        except Exception as exc:
            raise _tag(exc, label)
    return out
