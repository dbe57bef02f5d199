"""SIGTERM handled like Ctrl-C: the run stops where it is, writes its outputs, and says it was interrupted.

``ray job stop``, a scheduler's pre-emption and ``kill`` send SIGTERM. Python's default ends the process at once
(no summary, no saved policy), and ``ray.init`` installs a handler of its own that calls ``sys.exit``, which skips
the driver's interrupt handling; so the driver installs :func:`stop_on_sigterm` at its start and again once Ray is
up. The handler raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, and then restores the
default action, so a second SIGTERM during the clean-up ends the process as usual.

With a grace period (``run.sigterm_grace_s``), the first SIGTERM only asks the run to stop: the step under way
finishes, :func:`stop_at_step_end` then raises at the step boundary, where the run's state is consistent and a
checkpoint can be written. A step still running when the grace period ends is interrupted where it is (an alarm),
and a second SIGTERM interrupts at once, so a scheduler's kill deadline is never overrun by waiting.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM

_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


_grace_s = {"value": 0.0}


def _stop_now(reason: str) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated(reason)


def _on_sigterm(signum: int, frame: object) -> None:
    if _received.is_set() or _grace_s["value"] <= 0:  # no grace, or the second signal: stop where we are
        _received.set()
        _stop_now(f"received signal {signal.Signals(signum).name}")
    _received.set()
    signal.signal(signal.SIGALRM, _on_grace_over)
    signal.setitimer(signal.ITIMER_REAL, _grace_s["value"])


def _on_grace_over(signum: object, frame: object) -> None:
    _stop_now(f"received signal SIGTERM; the step did not end within {_grace_s['value']:.0f}s")


def stop_on_sigterm(grace_s: float | None = None) -> Any:
    """Make SIGTERM stop the run in the main thread (with ``grace_s`` > 0: at the end of the step under way, see
    the module docstring); returns the handler it replaced, for :func:`restore_sigterm` (``None``, and nothing
    done, when called from another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if grace_s is not None:
        _grace_s["value"] = float(grace_s)
    return signal.signal(signal.SIGTERM, _on_sigterm)


def stop_at_step_end() -> None:
    """At a step boundary: raise :class:`Terminated` if SIGTERM asked the run to stop during the step."""
    if _received.is_set() and threading.current_thread() is threading.main_thread():
        _stop_now("received signal SIGTERM; stopped at the end of the step")


def restore_sigterm(handler: Any) -> None:
    """Put back a handler :func:`stop_on_sigterm` returned (a run in a longer-lived process, e.g. a test)."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def reset() -> None:
    """Forget an earlier SIGTERM (a new run starts in this process)."""
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


def terminated() -> bool:
    """Whether SIGTERM arrived since the last :func:`reset`."""
    return _received.is_set()
