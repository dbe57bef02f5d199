"""SIGTERM handled like Ctrl-C: the run stops where it is, writes its outputs, and says it was interrupted.

``ray job stop``, a scheduler's pre-emption and ``kill`` send SIGTERM. Python's default ends the process at once
(no summary, no saved policy), and ``ray.init`` installs a handler of its own that calls ``sys.exit``, which skips
the driver's interrupt handling; so the driver installs :func:`stop_on_sigterm` at its start and again once Ray is
up. The handler raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, and then restores the
default action, so a second SIGTERM during the clean-up ends the process as usual.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM

_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    _received.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def stop_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the handler it replaced, for
    :func:`restore_sigterm` (``None``, and nothing done, when called from another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def restore_sigterm(handler: Any) -> None:
    """Put back a handler :func:`stop_on_sigterm` returned (a run in a longer-lived process, e.g. a test)."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def reset() -> None:
    """Forget an earlier SIGTERM (a new run starts in this process)."""
    _received.clear()


def terminated() -> bool:
    """Whether SIGTERM arrived since the last :func:`reset`."""
    return _received.is_set()
