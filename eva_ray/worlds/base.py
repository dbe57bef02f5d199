"""The world interface: what the driver, the evaluator and the curriculum evolver may ask of a task world.

A world is a family of procedurally generated tasks with a verifier and a difficulty knob. It supplies the seed set
D, a held-out evaluation set that nothing trained on can reach, its rewards by name, fresh tasks at given knobs,
the knobs of a task read back, the curriculum moves between knobs, what counts as solved, and the skill units a
task exercises (for the creator's health metrics). Subclass :class:`World`, decorate it with
:func:`register_world`, and the world is selectable as ``world.name`` with its own knobs under ``world.params``:

    @register_world
    class Parity(World):
        name = "parity"
        rewards = {"exact": "my_pkg.parity:exact_reward"}
        ...

Every task record's meta holds at least ``difficulty`` (an int) and ``answer`` (the one response that solves it),
so code that knows no world (plots, the buffer composition) can still group by difficulty.

The held-out split is shared: a stable hash of the task text puts every task in exactly one of two partitions
(:func:`is_held_out`), the seed set and every curriculum child come from the training one, evaluation from the
other, so evaluation is disjoint from training whatever seeds and sizes a run uses.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from eva_ray.records import PromptRecord

HARDER, EASIER, SIBLING = "harder", "easier", "sibling"
AT_MAX_DIFFICULTY = "at_max_difficulty"
AT_MIN_DIFFICULTY = "at_min_difficulty"
_HASH_BUCKETS = 10_000
_MAX_DRAWS_PER_ITEM, _MIN_DRAWS = 20, 5_000


class WorldParamError(ValueError):
    """A bad ``world.params`` value; the message starts with its dotted path (``world.params.letters: ...``)."""


@dataclass(frozen=True)
class Task:
    """One generated task: the prompt text and the meta its record carries (``difficulty`` and ``answer`` always)."""

    text: str
    meta_fields: Mapping[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return dict(self.meta_fields)

    @property
    def answer(self) -> str:
        return str(self.meta_fields["answer"])

    @property
    def difficulty(self) -> int:
        return int(self.meta_fields["difficulty"])

    def record(self, record_id: str) -> PromptRecord:
        return PromptRecord(id=record_id, text=self.text, source="seed", meta=self.meta())


def is_held_out(text: str, fraction: float = 0.2) -> bool:
    """Whether a task text (whitespace ignored) belongs to the evaluation partition; the same in every process."""
    canonical = "".join(str(text).split())
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _HASH_BUCKETS < fraction * _HASH_BUCKETS


def level_counts(n: int, mix: Mapping[int, float]) -> dict[int, int]:
    """Split ``n`` over levels in proportion to ``mix`` (largest remainder, ties to the lower level)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    levels = sorted(mix)
    weights = np.array([float(mix[d]) for d in levels])
    if not levels or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"mix must give non-negative weights with a positive sum, got {dict(mix)}")
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in sorted(range(len(levels)), key=lambda i: (-(exact[i] - counts[i]), levels[i]))[: n - counts.sum()]:
        counts[i] += 1
    return {d: int(c) for d, c in zip(levels, counts)}


def distinct_tasks(make: Callable[[np.random.Generator], Task], count: int, rng: np.random.Generator, *,
                   held_out: bool, exact: bool, fraction: float, what: str) -> list[Task]:
    """``count`` distinct tasks of one partition drawn with ``make``; fewer only when not ``exact`` and the space
    is small (then a level gives what it has)."""
    out: list[Task] = []
    seen: set[str] = set()
    budget = max(_MIN_DRAWS, _MAX_DRAWS_PER_ITEM * count)
    draws = 0
    while len(out) < count and draws < budget:
        draws += 1
        task = make(rng)
        if task.text in seen or is_held_out(task.text, fraction) != held_out:
            continue
        seen.add(task.text)
        out.append(task)
    if len(out) < count and exact:
        raise ValueError(f"{what}: found only {len(out)} distinct {'held-out' if held_out else 'training'} tasks "
                         f"in {draws} draws, {count} asked; lower this level's share of the mix")
    return out


class World(ABC):
    """A task world; see the module docstring. Instances are cheap and deterministic in ``(params, seed)``, so the
    driver and the creator (another process under Ray) build equal worlds from the same config."""

    name: ClassVar[str]
    rewards: ClassVar[Mapping[str, str]]
    """``world.reward`` choice -> ``module:callable`` of a reward function ``(prompt, response) -> float``."""
    default_reward: ClassVar[str]
    moves: ClassVar[tuple[str, ...]] = (HARDER, SIBLING, EASIER)
    """The curriculum operators this world supports (``evolve.operators``)."""
    default_model: ClassVar[str | None] = None
    """The shipped solver (``world:<name>``) a config gets when it names none."""
    held_out_fraction: ClassVar[float] = 0.2
    levels: tuple[int, ...]
    """The difficulty levels, easiest first; ``world.level_mix`` has one share per level."""
    default_mix: Mapping[int, float]
    param_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> None:
        unknown = sorted(set(params or {}) - set(self.param_defaults))
        if unknown:
            raise WorldParamError(f"world.params.{unknown[0]}: unknown for world {self.name!r}; allowed: "
                                  f"{', '.join(self.param_defaults) or 'none'}")
        self.params = {**self.param_defaults, **(params or {})}
        self.seed = int(seed)

    # --- sets -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def draw_task(self, knobs: Mapping[str, int], rng: np.random.Generator) -> Task:
        """One task at ``knobs`` (``difficulty`` and the world's other knobs), from either partition."""

    def sample_task(self, knobs: Mapping[str, int], rng: np.random.Generator, *, held_out: bool = False,
                    max_draws: int = 1000) -> Task:
        """A fresh task at ``knobs`` from the training (default) or the held-out partition; reproducible."""
        for _ in range(max_draws):
            task = self.draw_task(knobs, rng)
            if is_held_out(task.text, self.held_out_fraction) == held_out:
                return task
        raise RuntimeError(f"world {self.name}: no {'held-out' if held_out else 'training'} task at {dict(knobs)} "
                           f"in {max_draws} draws")

    def seed_set(self, n: int, mix: Mapping[int, float] | None = None, seed: int = 0) -> list[PromptRecord]:
        """D: ``n`` distinct training-partition tasks, split over levels by ``mix``, in a seeded shuffle; ids
        ``seed-<i>``."""
        mix = self.default_mix if mix is None else mix
        self._check_levels(mix)
        tasks: list[Task] = []
        for d, c in level_counts(n, mix).items():
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, d, *self._set_key()]))
            tasks.extend(self._distinct(d, c, rng, held_out=False, exact=True))
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, 0])).permutation(len(tasks))
        return [tasks[int(j)].record(f"seed-{i}") for i, j in enumerate(order)]

    def eval_set(self, n_per_level: int, seed: int = 0, *, levels: Sequence[int] | None = None
                 ) -> list[PromptRecord]:
        """Held-out tasks, up to ``n_per_level`` distinct ones per level (a small level gives all it has), grouped
        by level; ids ``eval-d<d>-<i>``."""
        out: list[PromptRecord] = []
        for d in self.levels if levels is None else levels:
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE7A1, int(d), *self._set_key()]))
            tasks = self._distinct(int(d), n_per_level, rng, held_out=True, exact=False)
            out.extend(t.record(f"eval-d{d}-{i}") for i, t in enumerate(tasks))
        return out

    def _set_key(self) -> tuple[int, ...]:
        """Extra entropy that tells this world's sets apart from another parametrisation's (e.g. num_terms)."""
        return ()

    def _distinct(self, d: int, count: int, rng: np.random.Generator, *, held_out: bool, exact: bool) -> list[Task]:
        knobs = self.base_knobs(d)
        return distinct_tasks(lambda g: self.draw_task(knobs, g), count, rng, held_out=held_out,
                              exact=exact, fraction=self.held_out_fraction, what=f"world {self.name} level {d}")

    def _check_levels(self, mix: Mapping[int, float]) -> None:
        bad = [d for d in mix if d not in self.levels]
        if bad:
            raise ValueError(f"world {self.name}: levels {bad} do not exist; levels are {list(self.levels)}")

    def base_knobs(self, difficulty: int) -> dict[str, int]:
        """The knobs of a seed or evaluation task at ``difficulty`` (other knobs at their configured values)."""
        return {"difficulty": int(difficulty)}

    # --- reading tasks back ---------------------------------------------------------------------------------------
    @abstractmethod
    def knobs(self, record: PromptRecord) -> dict[str, int]:
        """The knobs of a task record (from its meta, else parsed from its text); ValueError when not a task."""

    def difficulty(self, record: PromptRecord) -> int:
        meta = record.meta or {}
        if isinstance(meta.get("difficulty"), int):
            return meta["difficulty"]
        return self.knobs(record)["difficulty"]

    @abstractmethod
    def answer(self, record: PromptRecord) -> str:
        """The one response that solves the task (what teacher-forced evaluation scores)."""

    def solved(self, reward: float) -> bool:
        """Whether a reward means the task was solved (the evaluation's accuracy)."""
        return reward == 1.0

    def skill_units(self, record: PromptRecord) -> frozenset[str]:
        """The skill units a task exercises, for the creator's coverage metric; by default its level."""
        return frozenset({f"d{self.difficulty(record)}"})

    def all_skill_units(self) -> tuple[str, ...]:
        return tuple(f"d{d}" for d in self.levels)

    # --- the curriculum -------------------------------------------------------------------------------------------
    def move(self, operator: str, knobs: Mapping[str, int], *, min_difficulty: int, max_difficulty: int
             ) -> tuple[dict[str, int], str | None]:
        """The child's knobs under ``operator``, or a rejection reason when the parent cannot move that way."""
        d = int(knobs["difficulty"])
        if operator == HARDER:
            return {**knobs, "difficulty": d + 1}, AT_MAX_DIFFICULTY if d >= max_difficulty else None
        if operator == EASIER:
            return {**knobs, "difficulty": d - 1}, AT_MIN_DIFFICULTY if d <= min_difficulty else None
        if operator == SIBLING:  # the parent's own level, clamped into the allowed range (a seed may sit outside)
            return {**knobs, "difficulty": min(max(d, min_difficulty), max_difficulty)}, None
        raise ValueError(f"world {self.name} has no move {operator!r}; it has {', '.join(self.moves)}")

    def child_task(self, operator: str, parent: PromptRecord, knobs: Mapping[str, int],
                   rng: np.random.Generator) -> Task:
        """The task a curriculum move makes from ``parent`` at the moved ``knobs``: by default a fresh training task
        there. A world whose moves edit the parent (mark one more position) overrides this."""
        return self.sample_task(knobs, rng)

    # --- rewards --------------------------------------------------------------------------------------------------
    @classmethod
    def reward_function(cls, mode: str | None = None) -> str:
        """The ``reward.function`` path of this world's reward ``mode`` (``world.reward``; default its own)."""
        mode = cls.default_reward if mode is None else mode
        if mode not in cls.rewards:
            raise ValueError(f"world.reward: world {cls.name!r} has no reward {mode!r}; it has: "
                             f"{', '.join(cls.rewards)}")
        return cls.rewards[mode]


def exact_answer_reward(prompt: PromptRecord, response: Any) -> float:
    """1.0 when the response (surrounding whitespace stripped) is the task's answer (``meta["answer"]``), else 0.0:
    the reward of any world whose tasks have one answer. Never raises for a response; a prompt without an answer
    raises ValueError (a wiring error the reward actor counts, not a made-up 0)."""
    meta = prompt.meta or {}
    if meta.get("answer") is None:
        raise ValueError(f"prompt {prompt.id!r} carries no answer in its meta")
    return 1.0 if isinstance(response, str) and response.strip() == str(meta["answer"]) else 0.0


WORLDS: dict[str, type[World]] = {}
"""The registry: ``world.name`` -> its class. A dict, so a world registered later (a plug-in, a test) is a valid
config choice at once."""


def register_world(cls: type[World]) -> type[World]:
    """Class decorator: make ``cls`` selectable as ``world.name: <cls.name>``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    if cls.default_reward not in cls.rewards:
        raise ValueError(f"world {cls.name}: default_reward {cls.default_reward!r} is not one of its rewards")
    WORLDS[cls.name] = cls
    return cls
