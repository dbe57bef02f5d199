"""An offline iteration's data on disk: its prompt set, its responses with rewards, and its preference pairs.

Everything is Parquet, which pandas, pyarrow and Hugging Face ``datasets`` read as they are
(``load_dataset("parquet", data_files=".../pairs.parquet")``); the pairs file has TRL's preference columns
(``prompt``, ``chosen``, ``rejected``), so another trainer can take it unchanged. One folder per iteration::

    <run_dir>/offline/iter-001/
        prompts.parquet              the set: id, text, source, parent, operator, generation, informativeness
        children.parquet             (eva) every child the evolve step accepted, chosen for the set or not
        manifest.json                how the set was made (seed slice, or the evolve step's counts)
        estimate/shard-00000.parquet (eva) the previous set's responses under the current policy, for informativeness
        responses/shard-00000.parquet  k responses per prompt with token ids and rewards
        pairs.parquet                one best-vs-worst pair per prompt with a preference
        train_state.json             epoch, batch and update of the last learner checkpoint inside the iteration
        train-checkpoint/            that checkpoint
        policy/                      the policy at the iteration's end (Hugging Face format)
        done.json                    the iteration's figures; its presence marks the iteration finished

Every file is written whole and renamed into place (:mod:`eva_ray.atomic`), so a file that exists is complete: a
run killed mid-iteration resumes from the shards on disk and regenerates only the missing ones.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from eva_ray.atomic import remove_stale, write_bytes, write_json
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout

SHARD_KINDS: tuple[str, ...] = ("estimate", "responses")


def write_table(path: Path, rows: Sequence[dict[str, Any]], schema: pa.Schema) -> None:
    """``rows`` as one Parquet file at ``path``, written atomically."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue())


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


PROMPT_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("source", pa.string()), ("parent_id", pa.string()),
    ("operator", pa.string()), ("generation", pa.int64()), ("info", pa.float64()), ("record", pa.string()),
])
RESPONSE_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("response_index", pa.int64()), ("text", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int64())), ("response_token_ids", pa.list_(pa.int64())),
    ("finish_reason", pa.string()), ("policy_version", pa.int64()), ("reward", pa.float64()),
])
PAIR_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
    ("chosen_target", pa.float64()), ("rejected_target", pa.float64()),
    ("prompt_token_ids", pa.list_(pa.int64())), ("chosen_token_ids", pa.list_(pa.int64())),
    ("rejected_token_ids", pa.list_(pa.int64())), ("rewritten", pa.bool_()), ("original_chosen", pa.string()),
])


def prompt_row(record: PromptRecord) -> dict[str, Any]:
    return {"id": record.id, "prompt": record.prompt_text, "source": record.source, "parent_id": record.parent_id,
            "operator": record.operator, "generation": record.generation, "info": record.info,
            "record": json.dumps(record.to_dict())}


def response_rows(groups: Sequence[Sequence[Rollout]], rewards: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    return [{"prompt_id": r.prompt_id, "response_index": i, "text": r.text, "prompt_token_ids": r.prompt_token_ids,
             "response_token_ids": r.response_token_ids, "finish_reason": r.finish_reason,
             "policy_version": r.policy_version, "reward": float(reward)}
            for group, row in zip(groups, rewards) for i, (r, reward) in enumerate(zip(group, row))]


def groups_of(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Rollout]], list[list[float]]]:
    """Responses rows back into (prompt ids, rollout groups, reward rows), in the order the rows came."""
    ids: list[str] = []
    groups: dict[str, list[tuple[int, Rollout, float]]] = {}
    for row in rows:
        if row["prompt_id"] not in groups:
            ids.append(row["prompt_id"])
            groups[row["prompt_id"]] = []
        groups[row["prompt_id"]].append((row["response_index"], Rollout(
            prompt_id=row["prompt_id"], prompt_token_ids=list(row["prompt_token_ids"]), text=row["text"],
            response_token_ids=list(row["response_token_ids"]), finish_reason=row["finish_reason"],
            policy_version=row["policy_version"]), row["reward"]))
    ordered = [sorted(groups[i], key=lambda item: item[0]) for i in ids]
    return ids, [[r for _, r, _ in g] for g in ordered], [[w for _, _, w in g] for g in ordered]


class IterationStore:
    """The folder of iteration ``iteration`` (1-based) of the offline run in ``run_dir``."""

    def __init__(self, run_dir: str | Path, iteration: int) -> None:
        self.iteration = iteration
        self.path = Path(run_dir) / "offline" / f"iter-{iteration:03d}"
        remove_stale(self.path)  # half-written files of a killed run (nothing when the folder is not there yet)
        for kind in SHARD_KINDS:
            remove_stale(self.path / kind)

    def _folder(self, sub: str = "") -> Path:
        folder = self.path / sub if sub else self.path
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -------------------------------------------------------------------------------------------- the set

    @property
    def prompts_file(self) -> Path:
        return self.path / "prompts.parquet"

    def has_prompts(self) -> bool:
        return self.prompts_file.is_file()

    def write_prompts(self, records: Sequence[PromptRecord], about: dict[str, Any]) -> None:
        """The set, and what made it (``about``: seed slice or evolve step, with its counts)."""
        if not records:
            raise ValueError(f"iteration {self.iteration}: an empty prompt set")
        write_json(self._folder() / "manifest.json", {"prompts": len(records), "made": about}, indent=2)
        write_table(self.prompts_file, [prompt_row(r) for r in records], PROMPT_SCHEMA)

    def prompts(self) -> list[PromptRecord]:
        return _records(self.prompts_file)

    @property
    def children_file(self) -> Path:
        return self.path / "children.parquet"

    def write_children(self, records: Sequence[PromptRecord]) -> None:
        write_table(self._folder() / "children.parquet", [prompt_row(r) for r in records], PROMPT_SCHEMA)

    def children(self) -> list[PromptRecord]:
        return _records(self.children_file) if self.children_file.is_file() else []

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    # ------------------------------------------------------------------------------------------- shards

    def shard_file(self, kind: str, index: int) -> Path:
        if kind not in SHARD_KINDS:
            raise ValueError(f"unknown shard kind {kind!r}; allowed: {SHARD_KINDS}")
        return self.path / kind / f"shard-{index:05d}.parquet"

    @staticmethod
    def shard_bounds(n_prompts: int, size: int) -> list[tuple[int, int]]:
        """``[start, end)`` of each shard of ``size`` prompts (the last may be shorter)."""
        return [(start, min(start + size, n_prompts)) for start in range(0, n_prompts, size)]

    def write_shard(self, kind: str, index: int, groups: Sequence[Sequence[Rollout]],
                    rewards: Sequence[Sequence[float]]) -> None:
        self._folder(kind)
        write_table(self.shard_file(kind, index), response_rows(groups, rewards), RESPONSE_SCHEMA)

    def done_shards(self, kind: str, n_shards: int) -> list[int]:
        return [i for i in range(n_shards) if self.shard_file(kind, i).is_file()]

    def read_shards(self, kind: str, n_shards: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index in range(n_shards):
            rows.extend(read_table(self.shard_file(kind, index)))
        return rows

    # -------------------------------------------------------------------------------------------- pairs

    @property
    def pairs_file(self) -> Path:
        return self.path / "pairs.parquet"

    def has_pairs(self) -> bool:
        return self.pairs_file.is_file()

    def write_pairs(self, rows: Sequence[dict[str, Any]]) -> None:
        self._folder()
        write_table(self.pairs_file, rows, PAIR_SCHEMA)

    def pairs(self) -> list[dict[str, Any]]:
        return read_table(self.pairs_file)

    # ----------------------------------------------------------------------------------------- training

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "train-checkpoint"

    @property
    def policy_dir(self) -> Path:
        return self.path / "policy"

    def train_state(self) -> dict[str, Any] | None:
        path = self.path / "train_state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_train_state(self, state: dict[str, Any]) -> None:
        write_json(self.path / "train_state.json", state, indent=2)

    def drop_checkpoint(self) -> None:
        """Delete the learner checkpoint (a later iteration's replaces it for resuming): position first, so a kill in
        between leaves no position that names a missing checkpoint."""
        (self.path / "train_state.json").unlink(missing_ok=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def done(self) -> dict[str, Any] | None:
        path = self.path / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, figures: dict[str, Any]) -> None:
        write_json(self.path / "done.json", figures, indent=2, default=float)


def _records(path: Path) -> list[PromptRecord]:
    return [PromptRecord.from_dict(json.loads(row["record"])) for row in read_table(path)]


def responses_on_disk(run_dir: str | Path) -> int:
    """Responses generated by the run so far (every shard of every iteration, estimation passes included)."""
    return sum(pq.ParquetFile(path).metadata.num_rows
               for path in (Path(run_dir) / "offline").glob("iter-*/*/shard-*.parquet"))
