"""Resumable checkpoints of a whole run, and resuming from them.

A checkpoint is one folder ``<run_dir>/checkpoints/step-<k>`` holding everything the run needs to go on after step
``k`` exactly as if it had never stopped:

    learner/       the learner's DeepSpeed checkpoint (weights, optimizer, LR schedule) and learner.json (version, RNG)
    creator.json   the creator's whole state (buffer with scores and lineage, the seed set's order and cursor,
                   phase, evolve counters, RNGs, the evolve work in flight)
    driver.json    the step, the summary so far, the wandb run id, the evaluator's initial answers and every
                   rollout worker's call count (the seed of its next call)

It is written into ``.tmp-step-<k>`` and renamed into place once complete, so a crash mid-write leaves the previous
checkpoints as they were; the last ``learner.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from launch.handles import gather

CHECKPOINTS = "checkpoints"
DRIVER_STATE = "driver.json"
CREATOR_STATE = "creator.json"
LEARNER_DIR = "learner"
# Keys a resumed run may change; everything else must equal the saved config.
MUTABLE = ("run.total_steps", "run.call_timeout_s", "run.sigterm_grace_s", "logging.")


class ResumeError(RuntimeError):
    """The run directory cannot be resumed (no checkpoint, or a config that differs from the saved one)."""


def _name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a ``.tmp-`` folder is one a crash cut short)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / DRIVER_STATE).is_file())


def latest(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(system: Any, run_dir: str | Path, step: int, driver_state: dict[str, Any], *, keep: int) -> dict[str, Any]:
    """Write the checkpoint of step ``step`` (taken between steps) and keep the last ``keep``.

    Returns ``{"path", "step", "seconds", "bytes"}``. A checkpoint of this step that exists already is kept.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / _name(step)
    if (final / DRIVER_STATE).is_file():
        return {"path": str(final), "step": step, "seconds": 0.0, "bytes": _size(final)}
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{_name(step)}"
    tmp.mkdir()
    t0 = time.perf_counter()
    # The learner call is a collective over its ranks (each gets the same folder); the creator writes its own file.
    learner = gather([system.learner.call("save_checkpoint", str(tmp / LEARNER_DIR))])[0]
    gather([system.creator.call("save", str(tmp / CREATOR_STATE))])
    calls = [int(s["calls"]) for s in gather([w.call("stats") for w in system.rollout.workers])]
    state = {**driver_state, "step": step, "learner_version": system.learner_version,
             "learner_saved_version": learner.get("version") if isinstance(learner, dict) else None,
             "rollout_calls": calls}
    (tmp / DRIVER_STATE).write_text(json.dumps(state, default=str))
    if final.exists():  # an incomplete folder of this name (no driver.json): replaced
        shutil.rmtree(final)
    os.replace(tmp, final)
    seconds = time.perf_counter() - t0
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return {"path": str(final), "step": step, "seconds": seconds, "bytes": _size(final)}


def restore(system: Any, path: Path, *, in_flight: str = "reissue") -> tuple[dict[str, Any], dict[str, int]]:
    """Load a checkpoint into a freshly started system and sync the restored weights to the rollout workers.

    Returns the driver's saved state and the creator's ``{"reissued", "lost"}`` counts of in-flight evolve requests.
    """
    state = json.loads((path / DRIVER_STATE).read_text())
    version = gather([system.learner.call("load_checkpoint", str(path / LEARNER_DIR))])[0]
    resumed = gather([system.creator.call("load", str(path / CREATOR_STATE), in_flight=in_flight)])[0]
    calls = state.get("rollout_calls", [])
    if len(calls) == len(system.rollout.workers):  # the seeds of the workers' next calls, as in the first run
        gather([w.call("resume_calls", c) for w, c in zip(system.rollout.workers, calls)])
    system.learner_version = int(version)
    # The workers start from the run's base model (version 0) and jump to the restored version here.
    system.sync_weights()
    return state, resumed


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config trees, except those a resumed run may change."""
    a, b = _flat(saved), _flat(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return changed


def check_resumable(run_dir: Path, saved: dict[str, Any], new: dict[str, Any]) -> Path:
    """The checkpoint to resume ``run_dir`` from; raises :class:`ResumeError` naming what stands in the way."""
    changed = config_changes(saved, new)
    if changed:
        raise ResumeError(f"the config differs from the run's own ({run_dir / 'config.yaml'}) in {len(changed)} "
                          f"key(s) a resumed run may not change: {'; '.join(changed)} (only run.total_steps, "
                          "run.call_timeout_s, run.sigterm_grace_s and logging.* may change)")
    path = latest(run_dir)
    if path is None:
        raise ResumeError(f"{run_dir} has no checkpoint ({CHECKPOINTS}/step-*): the run stopped before its first "
                          "one (learner.checkpoint_every); start it again")
    return path
