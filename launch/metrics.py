"""Where metrics go: a JSONL file in the run directory and a wandb run, both keyed to ``train/global_step``.

The JSONL file is the run's own record (one JSON object per logged step, flushed at once, so a crash loses at most
the line being written); wandb is the live view. wandb runs offline when no API key is set, and an explicit
``WANDB_MODE`` in the environment always wins. Values may be scalars, lists (logged as histograms) or dicts of counts
(flattened to ``prefix/key`` scalars), so callers log what they have without formatting it for each sink.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from eva_ray.atomic import read_jsonl, write_text
from eva_ray.metrics import HIST_TAG, is_histogram
from launch.storage import writing

STEP_KEY = "train/global_step"


def wandb_mode(setting: str) -> str:
    """Resolve ``logging.wandb_mode``: the environment's WANDB_MODE wins, then the setting; auto picks by API key."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if setting != "auto":
        return setting
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null keeps the key visible
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if k != HIST_TAG}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """Turn nested count dicts into ``key/sub`` scalars; lists stay lists (histograms)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and not is_histogram(value):
            for sub, v in flatten({f"{key}/{k}": v for k, v in value.items()}).items():
                flat[sub] = v
        else:
            flat[key] = value
    return flat


def keep_until(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the lines of steps up to ``step`` (a resumed run logs the later ones again);
    a line torn by a crash mid-write goes too. Atomic; returns the lines kept."""
    return _cut(path, step)[0]


def _cut(path: Path, step: int) -> tuple[int, int]:
    """:func:`keep_until`, also returning the torn lines dropped."""
    if not path.exists():
        return 0, 0
    rows = read_jsonl(path)
    kept = [row for row in rows if isinstance(row, dict) and row.get(STEP_KEY, 0) <= step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return len(kept), rows.skipped


class MetricsLogger:
    """Writes every logged step to ``metrics.jsonl`` and (unless disabled) to wandb."""

    def __init__(self, run_dir: str | Path, *, project: str, run_name: str, config: dict[str, Any],
                 mode_setting: str = "auto", jsonl: bool = True, resume_id: str | None = None,
                 resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.torn_lines = 0
        """Lines of ``metrics.jsonl`` a crash or a full disk cut short, dropped when a resumed run cut it back."""
        if resume_step is not None:
            _, self.torn_lines = _cut(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8") if jsonl else None
        self.mode = wandb_mode(mode_setting)
        self._wandb = None
        self._run = None
        self.resume_refused: str | None = None
        """The line to print when wandb would not continue the checkpoint's run (its id still held)."""
        if self.mode != "disabled":
            import wandb

            self._wandb = wandb
            # quiet: no "Run history / Run summary" block at the end (the run prints its own summary last).
            start = dict(project=project, name=run_name, dir=str(self.run_dir), mode=self.mode, config=config,
                         reinit="finish_previous", settings=wandb.Settings(quiet=True))
            if resume_id:  # a resumed run continues the same wandb run (its id from the checkpoint)
                try:
                    self._run = wandb.init(**start, id=resume_id, resume="allow")
                except Exception as exc:  # noqa: BLE001 - wandb's own error types vary by version
                    # A killed run's wandb service can outlive it and still hold the id (a service shared
                    # through WANDB_SERVICE does): the metrics go to a new wandb run rather than stop the run.
                    if "in use" not in str(exc):
                        raise
                    self.resume_refused = (f"eva-ray: wandb run {resume_id} is still held by the killed run's "
                                           "service; this part of the run logs to a new wandb run (metrics.jsonl "
                                           "continues as before)")
            if self._run is None:  # a fresh id: after the refused attempt wandb would otherwise reuse the held one
                self._run = wandb.init(**start, **({"id": secrets.token_hex(4)} if self.resume_refused else {}))
            self._run.define_metric(STEP_KEY)
            self._run.define_metric("*", step_metric=STEP_KEY)

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (what a resumed run passes back as ``resume_id``); None without wandb."""
        return None if self._run is None else self._run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        flat = flatten(metrics)
        flat[STEP_KEY] = step
        self._append(flat)
        if self._run is not None:
            self._run.log({k: self._to_wandb(v) for k, v in flat.items() if not self._empty(v)})

    def _append(self, row: dict[str, Any]) -> None:
        """One line, flushed at once: a crash or a full disk can cut only this line short (readers skip it)."""
        if self._jsonl is not None:
            with writing("appending to metrics.jsonl", self.jsonl_path):
                self._jsonl.write(json.dumps(_jsonable(row)) + "\n")
                self._jsonl.flush()

    @staticmethod
    def _empty(value: Any) -> bool:
        return (isinstance(value, list) and not value) or (is_histogram(value) and not value["counts"])

    def _to_wandb(self, value: Any) -> Any:
        if is_histogram(value):
            return self._wandb.Histogram(np_histogram=(value["counts"], value["edges"]))
        if isinstance(value, list):
            return self._wandb.Histogram(value)
        return value

    def table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A wandb table (e.g. sampled evolved prompts); the JSONL file gets the same rows."""
        self._append({STEP_KEY: step, name: {"columns": columns, "rows": rows}})
        if self._run is not None and rows:
            self._run.log({name: self._wandb.Table(columns=columns, data=rows), STEP_KEY: step})

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._run is not None:
            if summary:
                for key, value in flatten(summary).items():
                    self._run.summary[key] = _jsonable(value)
            self._run.finish()
            self._run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
