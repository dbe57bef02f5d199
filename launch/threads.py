"""CPU threads per actor: as many as the CPUs the actor was given, set explicitly when it starts.

Ray sets ``OMP_NUM_THREADS`` for an actor from its CPU share (at least 1), and torch takes its thread count from
that, so a 2-CPU learner computed with 2 threads only by that convention and a fractional one with 1. The run now
says it outright: every actor's environment gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and its constructor
calls ``torch.set_num_threads`` with ``resources.<group>.num_threads`` (0: the CPUs reserved, rounded down, at
least 1). Inline runs keep the process's own setting: all actors share its threads.
"""

from __future__ import annotations

import math
import os
from typing import Any


def thread_count(resources: Any) -> int:
    """Threads for one actor of a group with these ``ActorResources``."""
    if resources.num_threads:
        return int(resources.num_threads)
    return max(1, math.floor(resources.num_cpus + 1e-9))


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def with_threads(cls: type, threads: int, plugins: list[str] | tuple[str, ...] = ()) -> type:
    """``cls`` whose constructor first sets torch's thread count and imports ``run.plugins`` (so what they register
    exists in this actor's process too), with ``eva_threads()`` to read the thread count back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import importlib

        import torch

        torch.set_num_threads(threads)
        for module in plugins:
            importlib.import_module(module)
        cls.__init__(self, *args, **kwargs)

    def eva_threads(self) -> dict[str, Any]:
        import torch

        return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    # The same name, so Ray's dashboard and error messages still say Learner, RolloutWorker, ...
    return type(cls.__name__, (cls,), {"__init__": __init__, "eva_threads": eva_threads,
                                       "__qualname__": cls.__qualname__, "__module__": cls.__module__})
