"""Actor deaths during a run: restartable actors come back, the others stop the run with the line that resumes it.

Ray restarts a dead rollout worker or reward actor (``resources.max_restarts``). :class:`Restarts` wraps each of
the driver's calls to them: when one fails because its actor died, it waits for the new process, and for a rollout
worker rebuilds the weight channel (a new process cannot join the old gloo group) and syncs the learner's current
weights into it, then retries the call. A worker can also die between two calls and come back unnoticed: its next
rollouts then carry the starting policy's version, or the next sync fails; either way its process id changed, which
:meth:`Restarts.restarted_workers` sees.

The learner and the creator hold the run's state: their death (or any actor that stops answering) ends the run with
:class:`ActorLost`, one line naming the actor and the ``--resume`` command.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Callable, TypeVar

from launch.handles import ActorTimeout, gather, is_actor_death

T = TypeVar("T")


class ActorLost(RuntimeError):
    """An actor that holds the run's state died or hung; the message names it and says how to resume."""


class WorkerRestarted(RuntimeError):
    """A rollout worker answered from a fresh process (it died and Ray restarted it between two calls)."""


def restartable(name: str) -> bool:
    return name.startswith("rollout-") or name == "reward"


def dead_actor(exc: BaseException) -> str | None:
    """The actor whose death caused ``exc`` (directly, or as the cause of a failed sync), if one did."""
    seen: set[int] = set()
    current: BaseException | None = exc
    named = getattr(exc, "eva_actor", None)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "eva_died", False) or is_actor_death(current):
            return getattr(current, "eva_actor", None) or named
        current = current.__cause__ or current.__context__
    return None


def _in_chain(exc: BaseException, cls: type) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, cls):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def resume_command(run_dir: str) -> str:
    """How this run is resumed: the console script, or ``python -m launch`` (as under ``ray job submit``)."""
    main = sys.argv[0] if sys.argv else ""
    program = "python -m launch" if main.endswith("__main__.py") else "eva-ray"
    return f"{program} run --resume {run_dir}"


def lost_line(exc: BaseException, run_dir: str, last_checkpoint: int | None, *, kept: str | None = None
              ) -> str | None:
    """The one line that stops a run whose learner or creator died or whose actor hung (None: another error).
    ``kept``: what a run that does not count steps (offline) has saved, said instead of the last checkpoint's step."""
    name = dead_actor(exc)
    timeout = _in_chain(exc, ActorTimeout)
    if timeout is not None:  # also behind a learner group's LearnerRankError
        what = str(timeout)
    elif name is not None:
        what = f"the {name} actor died ({type(exc).__name__})"
    else:
        return None
    if kept is not None:
        return f"{what}; {kept}; resume with: {resume_command(run_dir)}"
    if last_checkpoint is None:
        return f"{what}; no checkpoint was written yet (learner.checkpoint_every), so the run must start again"
    return f"{what}; the last checkpoint is step {last_checkpoint}; resume with: {resume_command(run_dir)}"


def _process_id(actor: Any) -> int:
    return os.getpid()


class Restarts:
    """Retries a driver call across restarts of rollout workers and the reward actor, and counts them."""

    def __init__(self, system: Any, *, max_restarts: int, echo: Callable[[str], None] = print,
                 ready_timeout_s: float = 600.0) -> None:
        self.system = system
        self.max_restarts = max_restarts
        self.echo = echo
        self.ready_timeout_s = ready_timeout_s
        self.counts: Counter = Counter()
        self._on_ray = hasattr(system.rollout.workers[0], "handle")  # a Ray actor (inline ones never restart)
        self._pids = self._worker_pids() if self._on_ray and max_restarts else []
        self._reward_pid = self._pid_of_reward() if self._on_ray and max_restarts else None

    def _worker_pids(self) -> list[int]:
        return [int(s.get("pid", -1)) for s in gather([w.call("stats") for w in self.system.rollout.workers])]

    def _pid_of_reward(self) -> int:
        return int(gather([self.system.reward.handle.__ray_call__.remote(_process_id)])[0])

    def _count_quiet_reward_restart(self) -> None:
        """A reward actor that died between two calls comes back before the next one fails: nothing to retry (it
        holds no state), but the restart is counted and said."""
        if self._reward_pid is None:
            return
        self._wait_ready(self.system.reward)  # a restart under way answers "unavailable" until it is done
        pid = self._pid_of_reward()
        if pid != self._reward_pid:
            self._reward_pid = pid
            self.counts["reward"] += 1
            self.echo("eva-ray: the reward actor was restarted by Ray between two calls")

    def restarted_workers(self) -> list[str]:
        """Rollout workers whose process changed since it was last seen (each answers ``stats``)."""
        if not self._pids:
            return []
        pids = self._worker_pids()
        return [w.name for w, old, new in zip(self.system.rollout.workers, self._pids, pids) if old != new]

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, again after each restart of a rollout worker or the reward actor it ran into."""
        attempts = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if isinstance(exc, ActorTimeout) or not self._on_ray or attempts >= self.max_restarts:
                    raise
                name = dead_actor(exc)
                if name is None:  # not a death that Ray reported; maybe a worker came back unnoticed
                    try:
                        restarted = self.restarted_workers()
                    except Exception:  # noqa: BLE001 - the probe failing says nothing; the first error stands
                        restarted = []
                    if not restarted:
                        raise
                    name = restarted[0]
                if not restartable(name):
                    raise
                attempts += 1
                self.echo(f"eva-ray: {name} died during {what}; waiting for Ray to restart it, then retrying "
                          f"({attempts}/{self.max_restarts})")
                self.recover(name)

    def recover(self, name: str) -> None:
        """Wait until every restartable actor answers; for a rollout worker rebuild the channel and resync."""
        t0 = time.monotonic()
        for handle in [*self.system.rollout.workers, self.system.reward]:
            self._wait_ready(handle)
        kind = "reward" if name == "reward" else "rollout"
        if kind == "rollout":
            self.system.reconnect_weights()
            # With rollout overlapped with learning the learner may be mid-step: take the version it sends.
            self.system.sync_weights(expect_version=False)
            self._pids = self._worker_pids()
        else:
            self._reward_pid = self._pid_of_reward()
        self.counts[kind] += 1
        self.echo(f"eva-ray: {name} is back after {time.monotonic() - t0:.1f}s"
                  + (f"; weights resynced at version {self.system.synced_version}" if kind == "rollout" else ""))

    def _wait_ready(self, handle: Any) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        died = 0
        while True:
            try:
                gather([handle.call("__ray_ready__")], timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorTimeout:
                raise
            except Exception as exc:
                # Unavailable while it restarts; a call sent just as it died may still fail as a death; one that
                # keeps dying has spent its restarts.
                died += type(exc).__name__ == "ActorDiedError"
                if died > 3 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def metrics(self) -> dict[str, dict[str, int]]:
        """Restarts so far, by group (``rollout/restarts``, ``reward/restarts``)."""
        self._count_quiet_reward_restart()
        return {"rollout": {"restarts": self.counts["rollout"]}, "reward": {"restarts": self.counts["reward"]}}
