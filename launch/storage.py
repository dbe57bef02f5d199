"""Storage faults during a run: a write that fails stops the run with one line, and a disk too small is said early.

A full disk, a quota or an I/O error surfaces as an ``OSError`` somewhere: in the driver's own writes, or inside an
actor (DeepSpeed's ``torch.save``, the creator's snapshot) and then wrapped by the call that waited on it.
:func:`storage_fault` finds it in the exception's chain; :func:`stop_line` turns it into the run's one line: what
failed, where, the space left there, the last complete checkpoint and the command that resumes the run.

:func:`checkpoint_bytes` estimates one checkpoint before the first is written (the learner's DeepSpeed state by
ZeRO stage and dtype, plus the creator's JSON state), so a run warns at its start when its directory cannot hold
``learner.keep_checkpoints + 1`` of them (the kept ones plus the one being written).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What a failing filesystem reports wherever it happens. Other OSErrors (a missing file, a refused permission) are
# storage faults only inside a write the run marked with :func:`writing`: a model folder that is not there is a
# config problem, and a timeout or a broken connection is also an OSError.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ESTALE}
# torch.save reports a failed write as a RuntimeError of its C++ zip writer, with no OSError behind it (seen on a
# full tmpfs with torch 2.13: "unexpected pos 10155712 vs 10155604", caused by "basic_ios::clear: iostream error").
WRITER_FAILURES = ("unexpected pos", "iostream error", "PytorchStreamWriter failed", "file write failed")
MB = 1e6


class StorageError(RuntimeError):
    """A write the run needs failed (a full disk, a quota, an I/O error); the message is the run's one stop line."""


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # Ray wraps an actor's exception; the original is its ``cause``.
        todo.extend([getattr(current, "cause", None), current.__cause__, current.__context__])


@contextmanager
def writing(what: str, where: str | Path) -> Iterator[None]:
    """Mark the block as the write ``what`` (e.g. "writing the checkpoint of step 30") into ``where``: an error
    that escapes it carries both, so the stop line can say what failed and where."""
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "eva_writing", None) is None:
            try:
                exc.eva_writing = (what, str(where))  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
        raise


def storage_fault(exc: BaseException) -> tuple[BaseException, str | None, str | None] | None:
    """The filesystem error behind ``exc`` with what was being written and where (from :func:`writing`), if a
    storage fault caused it (directly, inside an actor, or behind another error); None otherwise."""
    tags = [getattr(e, "eva_writing", None) for e in _chain(exc)]
    what, where = next((t for t in tags if t), (None, None))
    chain = list(_chain(exc))
    for current in chain:
        if isinstance(current, (TimeoutError, ConnectionError)) or not isinstance(current, OSError):
            continue
        if current.errno in STORAGE_ERRNOS or (what is not None and current.errno is not None):
            return current, what, where
    if what is not None:  # the innermost match: Ray's wrapper repeats the actor's whole traceback in its message
        matches = [e for e in chain if isinstance(e, RuntimeError) and any(m in str(e) for m in WRITER_FAILURES)]
        if matches:
            return matches[-1], what, where
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent); None when it cannot be asked."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: float | None) -> str:
    if n is None:
        return "unknown space"
    return f"{n / MB:.1f} MB" if n < 1000 * MB else f"{n / (1000 * MB):.1f} GB"


def stop_line(exc: BaseException, run_dir: str | Path, last_checkpoint: Path | None, resume_command: str) -> str | None:
    """The one line a storage fault stops the run with: what failed, where, the space left there, the last complete
    checkpoint and the resume command (None: ``exc`` is no storage fault)."""
    found = storage_fault(exc)
    if found is None:
        return None
    fault, what, where = found
    if what is None:
        label = getattr(exc, "eva_call", None)  # the actor call that wrote, as gather tagged it
        what = f"a write in {label}" if label else "a write"
    if isinstance(fault, OSError):
        where = where or fault.filename or run_dir
        reason = f"[Errno {fault.errno}] {fault.strerror or fault}"
    else:
        where = where or run_dir
        reason = f"{type(fault).__name__}: {str(fault).strip().splitlines()[0][:200]}"
    line = f"{what} failed at {where}: {reason}; {_mb(free_bytes(where))} free there; "
    if last_checkpoint is None:
        if resume_command:  # a resumed run that failed before it wrote anything: its checkpoints stand
            return line + f"once there is space, resume with: {resume_command}"
        return line + "no checkpoint was written yet, so the run must start again once there is space"
    return line + f"the last complete checkpoint is {last_checkpoint}; once there is space, resume with: {resume_command}"


# ----------------------------------------------------------------------------------------------- checkpoint size

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_MOMENTS = 2 * 4  # AdamW's m and v, fp32
FP32_MASTER = 4  # the fp32 copy of the weights that mixed precision steps on
CREATOR_BYTES_PER_PROMPT = 1000  # a prompt record in creator.json: text, lineage, scores (about 340 B measured
# for a chain_sum task; evolved natural-language prompts are longer)


def learner_checkpoint_bytes(params: int, dtype: str, zero_stage: int) -> int:
    """Bytes of one DeepSpeed checkpoint of ``params`` parameters (all ranks together).

    The module's weights in their own dtype (under ZeRO-3 they live only in the optimizer's fp32 partitions), the
    AdamW moments in fp32, and the fp32 master weights where the model trains in 16 bits.
    """
    dtype_bytes = DTYPE_BYTES[dtype]
    weights = 0 if zero_stage == 3 else dtype_bytes * params
    master = FP32_MASTER * params if dtype_bytes < 4 or zero_stage == 3 else 0
    return int(weights + master + ADAM_MOMENTS * params)


def checkpoint_bytes(cfg: Any, params: int, seed_prompts: int) -> dict[str, int]:
    """One checkpoint's estimated bytes: ``learner``, ``creator`` and ``total``."""
    learner = learner_checkpoint_bytes(params, cfg.model.dtype, cfg.learner.zero_stage)
    creator = CREATOR_BYTES_PER_PROMPT * (seed_prompts + cfg.creator.capacity)
    return {"learner": learner, "creator": creator, "total": learner + creator}


def model_params(model_path: str | None) -> int | None:
    """The policy's parameter count from its ``config.json`` (None when the shape cannot be read)."""
    from eva_ray.worlds import is_world_model, resolve_world_model
    from launch.plan import find_model_shape

    try:
        if is_world_model(model_path):  # a solver shipped in this repository: its folder has the config
            model_path = resolve_world_model(model_path)
        return find_model_shape(model_path).params
    except Exception:  # noqa: BLE001 - an estimate; a model whose shape we cannot read just gets no warning
        return None


def checkpoint_line(cfg: Any, seed_prompts: int | None = None) -> str | None:
    """``checkpoint: ~X MB each (learner A, creator B); keeping N needs ~Y MB`` (None: the model's shape is
    unknown). ``seed_prompts`` defaults to what the config says of the seed set."""
    params = model_params(cfg.model.path)
    if params is None:
        return None
    if seed_prompts is None:
        seed_prompts = cfg.world.seed_size if cfg.world.name else (cfg.data.max_prompts or 0)
    size = checkpoint_bytes(cfg, params, seed_prompts)
    what = (f"checkpoint: ~{_mb(size['total'])} each (learner {_mb(size['learner'])} at ZeRO-"
            f"{cfg.learner.zero_stage} in {cfg.model.dtype}, creator {_mb(size['creator'])}); ")
    if cfg.run.mode == "offline":
        return what + _offline_keeps(cfg, params)[1]
    keep = cfg.learner.keep_checkpoints
    return what + f"keeping {keep} while writing the next needs ~{_mb(size['total'] * (keep + 1))}"


def _offline_keeps(cfg: Any, params: int) -> tuple[int, str]:
    """(bytes, the words for them) of what an offline run keeps: its newest learner checkpoint while the next one
    is written beside it, and every iteration's policy."""
    learner = learner_checkpoint_bytes(params, cfg.model.dtype, cfg.learner.zero_stage)
    policy = DTYPE_BYTES[cfg.model.dtype] * params
    need = 2 * learner + cfg.offline.iterations * policy
    return need, (f"an offline run keeps the newest learner checkpoint while writing the next (~{_mb(2 * learner)}) "
                  f"and each iteration's policy (~{_mb(policy)}, {cfg.offline.iterations} iterations): ~{_mb(need)}")


def space_warning(cfg: Any, run_dir: Path, params: int | None, seed_prompts: int, existing: int = 0) -> str | None:
    """One line when ``run_dir``'s free space cannot hold ``keep_checkpoints + 1`` checkpoints, less the
    ``existing`` ones it holds already, or (offline) what :func:`_offline_keeps` counts (None: it can, or the run
    writes no checkpoints, or the sizes are unknown)."""
    if params is None or not (cfg.learner.checkpoint_every or cfg.run.mode == "offline"):
        return None
    free = free_bytes(run_dir)
    if cfg.run.mode == "offline":
        need, words = _offline_keeps(cfg, params)
        if free is None or free >= need:
            return None
        return (f"eva-ray: warning: {run_dir} has {_mb(free)} free, but {words}: free space, or the run will stop "
                "when the disk is full")
    each = checkpoint_bytes(cfg, params, seed_prompts)["total"]
    need = each * max(1, cfg.learner.keep_checkpoints + 1 - existing)
    if free is None or free >= need:
        return None
    return (f"eva-ray: warning: {run_dir} has {_mb(free)} free, but a checkpoint takes ~{_mb(each)} and the run "
            f"keeps {cfg.learner.keep_checkpoints} while writing the next (~{_mb(need)} more needed): free space or "
            "lower learner.keep_checkpoints, or the run will stop when the disk is full")
