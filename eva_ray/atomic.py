"""Writes that a crash or a full disk cannot leave half done, and reads that tolerate a torn last line.

Every file a run writes that a later step or a resume reads (summary, config, buffer snapshot, checkpoint files,
the saved policy) goes through this module:

    write_text(path, text)              # a file: temp file beside it, fsync, rename over it, fsync the directory
    with staged_dir(final) as tmp:      # a folder: filled under .tmp-<name> beside it, then renamed into place
        ...write into tmp...
    rows = read_jsonl(path)             # an append-only log: the rows, and rows.skipped lines that did not parse

A rename within one directory is atomic on POSIX filesystems, so a reader sees either the previous complete version
or the new complete one, never a truncated file. The fsyncs order the data before the rename: without them a
power loss after the rename can still leave an empty file on some filesystems (ext4 without auto_da_alloc, XFS).
A failed write removes its temp file or folder before the error goes on, so a full disk is not made fuller.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a filesystem without directory fsync makes this a no-op."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (the previous version stays readable until the rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], value: Any, **dumps: Any) -> None:
    """``json.dumps(value, **dumps)`` written atomically; serialising fails before anything is written."""
    write_text(path, json.dumps(value, **dumps))


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk (before the folder is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def remove_stale(parent: Path) -> list[Path]:
    """Delete the temp files and folders a crash or a failed write left in ``parent``; returns what went."""
    gone = []
    if parent.is_dir():
        for stale in parent.glob(f"{TMP_PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            gone.append(stale)
    return gone


@contextmanager
def staged_dir(final: str | os.PathLike[str], *, create: bool = True) -> Iterator[Path]:
    """A folder written under ``.tmp-<name>`` beside ``final`` and renamed to ``final`` once the block succeeds.

    A ``final`` that exists already is replaced only after the new folder is complete (it is moved aside, the new
    one renamed in, then the old one deleted). If the block raises, the temp folder is removed and ``final`` is as
    it was. ``create=False`` leaves making the folder to the writer (``save_pretrained`` makes its own); a writer
    that made nothing leaves ``final`` as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if create:
        tmp.mkdir()
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            return
        fsync_tree(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        _release_frames(exc)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _release_frames(exc: BaseException) -> None:
    """Drop the locals of the frames ``exc`` (and what it chains) went through. A writer that failed mid-file (torch's
    zip writer on a full disk) stays open as long as its frame is referenced by the traceback, and an unlinked file
    that is still open keeps its blocks: without this, removing the temp folder frees no space until the error is
    gone, and the run's last writes (summary, policy) fail for lack of the space just given back."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


class JsonlRows(list):
    """The rows of a JSONL file; ``skipped`` counts the lines that did not parse (a line torn by a crash)."""

    skipped: int = 0


def read_jsonl(path: str | os.PathLike[str]) -> JsonlRows:
    """Every JSON line of ``path`` in order. An append-only log can end in a line cut short by a crash or a full
    disk: such lines are skipped and counted in ``.skipped`` rather than failing the read."""
    rows = JsonlRows()
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.skipped += 1
    return rows
