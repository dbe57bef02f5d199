"""Prompt records: one training prompt and its lineage.

Every prompt the creator hands to the solver is a :class:`PromptRecord`. Seed prompts come from the user's data set
(``source="seed"``, generation 0); evolved prompts carry the id of the prompt they were evolved from, their depth in
the evolution tree and the operator that made them. Informativeness is either *measured* (from the solver's own
rewards on this prompt) or *inherited* from the parent until the prompt is first trained on. Keeping all of this on
the record lets a run's curriculum be read back, plotted and resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Source = Literal["seed", "evolved"]
Message = dict[str, str]

SOURCES: tuple[str, ...] = ("seed", "evolved")


@dataclass
class PromptRecord:
    """One prompt and where it came from."""

    id: str
    """Unique within a run. Seed ids are ``seed-<row>``; evolved ids are derived from the parent id."""
    text: str | None = None
    """The prompt as plain text (a single user turn). Exactly one of ``text`` and ``messages`` is set."""
    messages: list[Message] | None = None
    """The prompt as chat messages (``[{"role": ..., "content": ...}, ...]``), for multi-turn seeds."""
    source: Source = "seed"
    parent_id: str | None = None
    generation: int = 0
    """0 for seeds; a child's generation is its parent's plus one."""
    operator: str | None = None
    """The evolve operator that produced this prompt (``None`` for seeds)."""
    info: float | None = None
    """Informativeness used as sampling priority; ``None`` until measured or inherited."""
    info_measured: bool = False
    """True once ``info`` comes from this prompt's own rewards rather than the parent's."""
    step_born: int = 0
    """The learner step after which this prompt entered the run (0 for seeds)."""
    times_trained: int = 0
    last_sampled_step: int | None = None
    """The last step this prompt was put into a training batch (drives the staleness term)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form, JSON-serialisable extras (e.g. the difficulty attributes of a procedural task)."""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"prompt {self.id!r}: set exactly one of text and messages")
        if self.source not in SOURCES:
            raise ValueError(f"prompt {self.id!r}: source {self.source!r} is not one of {SOURCES}")

    @property
    def prompt_text(self) -> str:
        """The text an evolve operator rewrites: the plain text, or the last user turn of a chat prompt."""
        if self.text is not None:
            return self.text
        user_turns = [m["content"] for m in self.messages or [] if m.get("role") == "user"]
        return user_turns[-1] if user_turns else self.messages[-1]["content"]

    def as_messages(self) -> list[Message]:
        """The prompt as chat messages, ready for a chat template."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text}]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> PromptRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"unknown prompt record fields: {sorted(unknown)}")
        return cls(**row)


def child_id(parent_id: str, step: int, index: int) -> str:
    """A readable, collision-free id for the ``index``-th child evolved from ``parent_id`` at ``step``.

    The generation depth shows in the id length, so ids are shortened with a hash once they grow long.
    """
    raw = f"{parent_id}/s{step}c{index}"
    if len(raw) <= 64:
        return raw
    return f"evo-{hashlib.sha1(raw.encode()).hexdigest()[:16]}"


def make_child(
    parent: PromptRecord, text: str, *, operator: str, step: int, index: int, meta: dict[str, Any] | None = None
) -> PromptRecord:
    """An evolved prompt that inherits its parent's informativeness until it is measured itself."""
    return PromptRecord(
        id=child_id(parent.id, step, index),
        text=text,
        source="evolved",
        parent_id=parent.id,
        generation=parent.generation + 1,
        operator=operator,
        info=parent.info,
        info_measured=False,
        step_born=step,
        meta=dict(meta or {}),
    )
