"""Resumable checkpoints of a whole run, and resuming from them.

A checkpoint is one folder ``<run_dir>/checkpoints/step-<k>`` holding everything the run needs to go on after step
``k`` exactly as if it had never stopped:

    learner/       the learner's DeepSpeed checkpoint (weights, optimizer, LR schedule) and learner.json (version, RNG)
    creator.json   the creator's whole state (buffer with scores and lineage, the seed set's order and cursor,
                   phase, evolve counters, RNGs, the evolve work in flight)
    driver.json    the step, the summary so far, the wandb run id, the evaluator's initial answers and every
                   rollout worker's call count (the seed of its next call)

    manifest.json  written last: every file above with its size and SHA-256

It is written into ``.tmp-step-<k>`` (:func:`eva_ray.atomic.staged_dir`) and renamed into place once complete, so a
crash or a full disk mid-write leaves the previous checkpoints as they were and no temp folder behind; the last
``learner.keep_checkpoints`` are kept. Before a checkpoint is loaded its files are checked against its manifest:
``--resume`` skips a damaged one (saying which file and how many steps that costs) and takes the newest intact one.
A checkpoint without a manifest (written before manifests existed) is checked only for readable JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from eva_ray.atomic import remove_stale, staged_dir, write_json
from launch.handles import gather
from launch.storage import writing

CHECKPOINTS = "checkpoints"
DRIVER_STATE = "driver.json"
CREATOR_STATE = "creator.json"
LEARNER_DIR = "learner"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "eva-ray-checkpoint"
# Keys a resumed run may change; everything else must equal the saved config.
MUTABLE = ("run.total_steps", "run.call_timeout_s", "run.sigterm_grace_s", "logging.",
           # offline: a finished run goes on for more iterations; checkpoints may come more or less often
           "offline.iterations", "offline.checkpoint_every")


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
                  and ((p / MANIFEST).is_file() or (p / DRIVER_STATE).is_file()))


def latest(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def path_of(run_dir: str | Path, step: int | None) -> Path | None:
    """The folder of the checkpoint of ``step`` (None for None)."""
    return None if step is None else Path(run_dir) / CHECKPOINTS / _name(step)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256s(paths: list[Path]) -> list[str]:
    """The digests of ``paths``, several files at once: hashlib releases the GIL, and a ZeRO checkpoint is one file
    per rank. Hashing reads the checkpoint once more (about 0.4 GB/s per core measured on a loaded 2-core machine)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: Path, step: int) -> dict[str, Any]:
    """List every file under ``folder`` with its size and SHA-256 in ``manifest.json``: the last file written."""
    paths = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]
    files = {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": digest}
             for f, digest in zip(paths, _sha256s(paths))}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}
    write_json(folder / MANIFEST, manifest, indent=1)
    return manifest


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (None: intact): the first file that is missing, of the
    wrong size, of the wrong checksum, or (without a manifest) not readable JSON."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        for name in (DRIVER_STATE, CREATOR_STATE, f"{LEARNER_DIR}/learner.json"):
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                return f"{name} is unreadable ({type(exc).__name__}) and there is no {MANIFEST}"
        return None
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    for name in (DRIVER_STATE, CREATOR_STATE):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, want in files.items():  # sizes first: a truncated or emptied file needs no hashing
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']}"
    for (name, want), digest in zip(files.items(), _sha256s([path / name for name in files])):
        if digest != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save(system: Any, run_dir: str | Path, step: int, driver_state: dict[str, Any], *, keep: int) -> dict[str, Any]:
    """Write the checkpoint of step ``step`` (taken between steps) and keep the last ``keep``.

    Returns ``{"path", "step", "seconds", "bytes"}``. An intact checkpoint of this step that exists already is kept;
    a damaged one is replaced. A write that fails (a full disk) removes what it wrote and raises.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / _name(step)
    if final.is_dir() and damage(final) is None:
        return {"path": str(final), "step": step, "seconds": 0.0, "bytes": _size(final)}
    remove_stale(root)  # left by a crash mid-write
    t0 = time.perf_counter()
    with writing(f"writing the checkpoint of step {step}", root), staged_dir(final) as tmp:
        # The learner call is a collective over its ranks (each gets the same folder); the creator writes its own
        # file.
        learner = gather([system.learner.call("save_checkpoint", str(tmp / LEARNER_DIR))])[0]
        gather([system.creator.call("save", str(tmp / CREATOR_STATE))])
        calls = [int(s["calls"]) for s in gather([w.call("stats") for w in system.rollout.workers])]
        state = {**driver_state, "step": step, "learner_version": system.learner_version,
                 "learner_saved_version": learner.get("version") if isinstance(learner, dict) else None,
                 "rollout_calls": calls}
        write_json(tmp / DRIVER_STATE, state, default=str)
        write_manifest(tmp, step)
    seconds = time.perf_counter() - t0
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return {"path": str(final), "step": step, "seconds": seconds, "bytes": _size(final)}


def restore(system: Any, path: Path, *, in_flight: str = "reissue") -> tuple[dict[str, Any], dict[str, int]]:
    """Load a checkpoint into a freshly started system and sync the restored weights to the rollout workers.

    Returns the driver's saved state and the creator's ``{"reissued", "lost"}`` counts of in-flight evolve requests.
    """
    state = json.loads((path / DRIVER_STATE).read_text())  # checked by choose() before any actor started
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


def split_resume_path(resume: str | Path) -> tuple[Path, Path | None]:
    """``--resume`` names a run directory, or one checkpoint folder of one: (run directory, that checkpoint)."""
    path = Path(resume)
    if not (path / "config.yaml").is_file() and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    return path, None


def _set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint out of the ``step-*`` names (kept for a look, never resumed from or rotated)."""
    target = path.with_name(f"{why}-{path.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{why}-{path.name}-{suffix}")
    os.replace(path, target)
    return target


def choose(run_dir: Path, wanted: Path | None = None) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, verified, and the lines that say what was skipped on the way.

    Without ``wanted``: the newest intact checkpoint; each newer damaged one is renamed ``damaged-step-*``. With
    ``wanted``: that one, which must be intact; newer ones are renamed ``superseded-step-*`` (or ``damaged-``), since
    the resumed run writes their steps again. Raises :class:`ResumeError` when nothing intact is left.
    """
    found = checkpoints(run_dir)
    if not found:
        raise ResumeError(f"{run_dir} has no checkpoint ({CHECKPOINTS}/step-*): the run stopped before its first "
                          "one (learner.checkpoint_every); start it again")
    remove_stale(run_dir / CHECKPOINTS)  # a write cut short before the run stopped: space the resumed run needs
    notes: list[str] = []
    if wanted is not None:
        wanted = Path(wanted)
        if wanted.resolve() not in [p.resolve() for p in found]:
            raise ResumeError(f"{wanted} is not a checkpoint of {run_dir}; its checkpoints are "
                              f"{', '.join(p.name for p in found)}")
        problem = damage(wanted)
        if problem is not None:
            raise ResumeError(f"checkpoint {wanted} is damaged: {problem}")
        for newer in [p for p in found if step_of(p) > step_of(wanted)]:
            kind = "damaged" if damage(newer) is not None else "superseded"
            notes.append(f"eva-ray: checkpoint {newer.name} is newer than the one resumed from; set aside as "
                         f"{_set_aside(newer, kind).name}")
        return wanted, notes
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            for bad, why in damaged:  # renamed only once an intact one is found: otherwise all stay for repair
                notes.append(f"eva-ray: checkpoint {bad.name} is damaged ({why}); set aside as "
                             f"{_set_aside(bad, 'damaged').name}")
            if damaged:
                notes.append(f"eva-ray: resuming from the newest intact checkpoint, step {step_of(path)}: "
                             f"{step_of(found[-1]) - step_of(path)} steps earlier than the newest one")
            return path, notes
        damaged.append((path, problem))
    raise ResumeError(f"no intact checkpoint in {run_dir / CHECKPOINTS}: "
                      f"{'; '.join(f'{p.name}: {why}' for p, why in damaged)}; start the run again")


def check_resumable(run_dir: Path, saved: dict[str, Any], new: dict[str, Any],
                    wanted: Path | None = None) -> tuple[Path, list[str]]:
    """The checkpoint to resume ``run_dir`` from and what was skipped (:func:`choose`); raises
    :class:`ResumeError` naming what stands in the way (a config that differs, no intact checkpoint)."""
    changed = config_changes(saved, new)
    if changed:
        raise ResumeError(f"the config differs from the run's own ({run_dir / 'config.yaml'}) in {len(changed)} "
                          f"key(s) a resumed run may not change: {'; '.join(changed)} (only run.total_steps, "
                          "run.call_timeout_s, run.sigterm_grace_s and logging.* may change)")
    return choose(run_dir, wanted)
