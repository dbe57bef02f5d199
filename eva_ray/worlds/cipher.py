"""The cipher world: a proving ground where RL learns in minutes, reward is exponentially sparse in difficulty,
and skills compose.

A secret key ``f`` maps each of the first ``letters`` lowercase letters to another one (a derangement: no letter maps
to itself), drawn from the run's seed. A prompt has ``length`` letters; some are *marked* (written in upper case).
The answer copies the plain letters and encrypts the marked ones:

    prompt  aBcdEf      (difficulty 2: two marked positions)
    answer  a f(b) c d f(e) f   ->  e.g. "ahcdjf"

The difficulty ``d`` is the number of marked positions (1..length); every prompt has the same length, so what RL
learns about a letter at one position carries to every difficulty (a variant whose difficulty was the prompt length
did not: what was learned at some lengths stayed there). Reward 1 for the exact answer, else 0.

The shipped solver (``world:cipher_solver``, ``scripts/pretrain_cipher.py``) was pretrained on a different, noisy
task: at a marked position the target is the input letter with probability 0.3, else a uniformly random other
letter. It knows the format and the copying but not ``f``: its chance of an exact answer is about
``(0.7 / (letters - 1)) ** d``, so d = 1 prompts give a reward spread among 8 samples about half the time and
d >= 4 almost never. A creator that starts from easy prompts can climb; a static set of hard prompts stalls.

Curriculum moves: ``harder`` marks one more position of the parent, ``easier`` unmarks one, ``sibling`` draws a
fresh prompt at the parent's difficulty. The skill units (creator coverage) are the letters, each counted when it is
marked in a prompt of difficulty <= ``unit_max_difficulty``: where a letter's image is learned.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import numpy as np

from eva_ray.records import PromptRecord
from eva_ray.worlds import base
from eva_ray.worlds.base import Task, World, WorldParamError, register_world

WORLD = "cipher"


def derangement(letters: int, seed: int) -> tuple[int, ...]:
    """A uniformly random permutation of ``range(letters)`` with no fixed point (rejection sampling), from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC1F3]))
    while True:
        perm = rng.permutation(letters)
        if not np.any(perm == np.arange(letters)):
            return tuple(int(v) for v in perm)


exact_reward = base.exact_answer_reward
"""``world.reward: exact``: 1.0 for the exact answer, else 0.0."""


@register_world
class CipherWorld(World):
    """The cipher world behind the world interface; see the module docstring. Knob: ``difficulty``.

    ``world.params``: ``letters`` (alphabet size K, 2..26, default 10), ``length`` (letters per prompt, default 6;
    the levels are 1..length), ``key_seed`` (the seed of the derangement; unset: the run's seed) and
    ``unit_max_difficulty`` (default 2: a letter counts as covered when it is marked in a prompt this easy).
    """

    name = WORLD
    rewards = {"exact": f"{__name__}:exact_reward"}
    default_reward = "exact"
    default_model = "world:cipher_solver"
    param_defaults = {"letters": 10, "length": 6, "key_seed": None, "unit_max_difficulty": 2}

    def __init__(self, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        p = self.params
        for key, low, high in (("letters", 2, 26), ("length", 1, 16), ("unit_max_difficulty", 1, 16)):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or not low <= p[key] <= high:
                raise WorldParamError(f"world.params.{key}: {p[key]!r}; allowed: an integer in {low}..{high}")
        if p["key_seed"] is not None and (isinstance(p["key_seed"], bool) or not isinstance(p["key_seed"], int)):
            raise WorldParamError(f"world.params.key_seed: {p['key_seed']!r}; allowed: an integer, or null for "
                                  "the run's seed")
        self.n_letters, self.length = int(p["letters"]), int(p["length"])
        self.alphabet = string.ascii_lowercase[: self.n_letters]
        self.key = derangement(self.n_letters, self.seed if p["key_seed"] is None else p["key_seed"])
        self.levels = tuple(range(1, self.length + 1))
        self.default_mix = {d: 1.0 for d in self.levels}

    # --- tasks ----------------------------------------------------------------------------------------------------
    def encrypt(self, letter: str) -> str:
        return self.alphabet[self.key[self.alphabet.index(letter)]]

    def task(self, letters: str, marked: set[int] | frozenset[int]) -> Task:
        """The task over plain ``letters`` with the positions in ``marked`` marked."""
        text = "".join(c.upper() if i in marked else c for i, c in enumerate(letters))
        answer = "".join(self.encrypt(c) if i in marked else c for i, c in enumerate(letters))
        return Task(text, {"world": WORLD, "answer": answer, "difficulty": len(marked)})

    def parse(self, text: str) -> tuple[str, frozenset[int]]:
        """(plain letters, marked positions) of a prompt text; ValueError when it is not a task of this world."""
        if not isinstance(text, str) or len(text) != self.length or any(c.lower() not in self.alphabet for c in text):
            raise ValueError(f"not a {WORLD} task of {self.length} letters from {self.alphabet!r}: {str(text)[:40]!r}")
        return text.lower(), frozenset(i for i, c in enumerate(text) if c.isupper())

    def draw_task(self, knobs: Mapping[str, int], rng: np.random.Generator) -> Task:
        d = int(knobs["difficulty"])
        if not 0 <= d <= self.length:
            raise ValueError(f"difficulty {d} is outside 0..{self.length}")
        letters = "".join(self.alphabet[int(i)] for i in rng.integers(0, self.n_letters, size=self.length))
        marked = frozenset(int(i) for i in rng.choice(self.length, size=d, replace=False))
        return self.task(letters, marked)

    def knobs(self, record: PromptRecord) -> dict[str, int]:
        _, marked = self.parse(record.prompt_text)
        return {"difficulty": len(marked)}

    def answer(self, record: PromptRecord) -> str:
        meta = record.meta or {}
        if meta.get("answer") is not None:
            return str(meta["answer"])
        letters, marked = self.parse(record.prompt_text)
        return self.task(letters, marked).answer

    def skill_units(self, record: PromptRecord) -> frozenset[str]:
        letters, marked = self.parse(record.prompt_text)
        if len(marked) > self.params["unit_max_difficulty"]:
            return frozenset()
        return frozenset(letters[i] for i in marked)

    def all_skill_units(self) -> tuple[str, ...]:
        return tuple(self.alphabet)

    # --- the curriculum: edit the parent for harder / easier ------------------------------------------------------
    def child_task(self, operator: str, parent: PromptRecord, knobs: Mapping[str, int],
                   rng: np.random.Generator) -> Task:
        if operator not in (base.HARDER, base.EASIER):
            return super().child_task(operator, parent, knobs, rng)
        letters, marked = self.parse(parent.prompt_text)
        pool = [i for i in range(self.length) if (i in marked) == (operator == base.EASIER)]
        for i in rng.permutation(pool):  # the first edit that stays in the training partition
            task = self.task(letters, marked ^ {int(i)})
            if not base.is_held_out(task.text, self.held_out_fraction):
                return task
        return self.sample_task(knobs, rng)  # every edit is held out (rare): a fresh prompt at that level


__all__ = ["CipherWorld", "WORLD", "derangement", "exact_reward"]
