"""The lineage log: every prompt the creator handles, one JSON line per event, appended as it happens.

``lineage.jsonl`` in the run directory survives any crash up to its last flushed line, so a run's curriculum can be
replayed without the buffer snapshot or the metrics. Events (each line has ``event`` and ``step``):

- ``trained``: a prompt of step ``step``'s minibatch, with its measured informativeness (``info``, null when its
  rewards were unusable), its lineage and whether it came from the buffer;
- ``added``: an evolved child entered the buffer (the whole record: text, parent, operator, generation, meta);
- ``rejected``: an evolve answer that failed validation, with its ``reason`` and ``text``;
- ``failed``: an evolve request whose LLM call failed, with its ``cause`` and ``error``;
- ``evicted`` / ``duplicate``: a child pushed out of the full buffer, or refused by it as a repeated id;
- ``lost``: evolve requests that were in flight at a checkpoint and were not issued again on resume;
- ``resumed``: the log was cut back to a checkpoint and the run goes on from there.

``step`` is the learner step the event belongs to: the minibatch's step for ``trained``, the step whose report
started the evolving for the evolve events.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from eva_ray.atomic import JsonlRows, read_jsonl

LINEAGE_FILE = "lineage.jsonl"


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN) and containers walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class LineageLog:
    """Appends events to ``path``; each :meth:`write` ends with a flush, so what was written is on disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the creator may run on a node without the run dir
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, events: list[dict[str, Any]]) -> None:
        if not events or self._fh is None:
            return
        self._fh.write("".join(json.dumps(_jsonable(e), default=str) + "\n" for e in events))
        self._fh.flush()

    def offset(self) -> int:
        """Bytes written so far: what a checkpoint records to cut the log back to on resume."""
        if self._fh is None:
            return self.path.stat().st_size if self.path.exists() else 0
        self._fh.flush()
        return self._fh.tell()

    def truncate(self, offset: int) -> None:
        """Drop everything after ``offset`` (events of steps a resumed run makes again)."""
        if self._fh is not None:
            self._fh.flush()
            if offset < self._fh.tell():
                self._fh.truncate(offset)
                self._fh.seek(offset)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_lineage(path: str | os.PathLike[str]) -> JsonlRows:
    """The events of a lineage log, in order; a last line cut short by a crash is skipped and counted in
    ``.skipped``."""
    return read_jsonl(path)
