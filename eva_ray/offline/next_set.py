"""Which prompts an offline iteration trains on.

eva (arXiv 2411.00062, appendix "Iterative Training Settings for Offline eva"): score the current set by
informativeness, draw a share of it (25%) by sampling weighted by the normalised scores, evolve every drawn prompt
(4 children each), and form the next set, of the same size, from the children (80%) and the current set (20%),
each part drawn uniformly. The static baseline instead trains each iteration on a fresh slice of D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from eva_ray.records import PromptRecord


@dataclass
class Draw:
    """The informative subset, and how it was drawn."""

    parents: list[PromptRecord]
    uniform_fallback: bool = False
    """No prompt had a positive score (no reward spread anywhere): the subset was drawn uniformly."""
    positive: int = 0
    """Prompts with a positive score."""


def draw_informative(records: Sequence[PromptRecord], scores: Sequence[float], fraction: float,
                     rng: np.random.Generator) -> Draw:
    """``ceil(fraction * len(records))`` prompts drawn without replacement, with probability proportional to score.

    Scores that are NaN (no finite reward) or negative count as 0. When fewer prompts than the draw asks for have a
    positive score, all of those are taken and the rest drawn uniformly from the others; with none positive the
    whole draw is uniform (and says so), since an all-zero weight vector states no preference.
    """
    if len(records) != len(scores):
        raise ValueError(f"{len(records)} prompts but {len(scores)} scores")
    if not records:
        return Draw([])
    n = min(len(records), max(1, int(np.ceil(fraction * len(records)))))
    weights = np.nan_to_num(np.asarray(scores, dtype=float), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    positive = np.flatnonzero(weights > 0)
    if len(positive) == 0:
        picked = rng.choice(len(records), size=n, replace=False)
        return Draw([records[i] for i in sorted(picked)], uniform_fallback=True)
    if len(positive) <= n:
        rest = np.setdiff1d(np.arange(len(records)), positive)
        extra = rng.choice(rest, size=n - len(positive), replace=False) if n > len(positive) else []
        picked = np.concatenate([positive, np.asarray(extra, dtype=int)])
    else:
        picked = rng.choice(len(records), size=n, replace=False, p=weights / weights.sum())
    return Draw([records[i] for i in sorted(int(i) for i in picked)], positive=int(len(positive)))


@dataclass
class Mix:
    """The next iteration's set and where its prompts came from."""

    prompts: list[PromptRecord]
    evolved: int
    kept: int
    short: int = 0
    """Evolved prompts the mix wanted but the evolve step did not deliver (filled from the current set)."""
    counts: dict[str, int] = field(default_factory=dict)


def mix_next_set(children: Sequence[PromptRecord], current: Sequence[PromptRecord], size: int, evolved_share: float,
                 rng: np.random.Generator) -> Mix:
    """``size`` prompts: ``round(evolved_share * size)`` children drawn uniformly, the rest from ``current``.

    Too few children: every child is taken and the current set fills the gap (``short`` counts it). The current set
    is drawn without replacement while it lasts; a set smaller than what is asked of it is cycled.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    want = int(round(evolved_share * size))
    take = min(want, len(children))
    chosen = [children[i] for i in sorted(rng.choice(len(children), size=take, replace=False))] if take else []
    need = size - take
    if need and not current:
        raise ValueError(f"the next set needs {need} prompts from the current set, which is empty")
    kept: list[PromptRecord] = []
    while len(kept) < need:
        order = rng.permutation(len(current))[: need - len(kept)]
        kept.extend(current[i] for i in sorted(order))
    return Mix(chosen + kept, evolved=take, kept=len(kept), short=want - take)


def fresh_slice(seed: Sequence[PromptRecord], iteration: int, size: int, seed_value: int) -> tuple[list[PromptRecord], int]:
    """The static baseline's set for ``iteration`` (1-based): the next ``size`` prompts of D in order.

    D is walked once in its order, then again in a fresh order seeded by ``seed_value`` and the pass number, so an
    iteration never repeats a prompt within a pass. Returns the prompts and how many passes over D they reached
    into (1: none repeated so far).
    """
    if not seed:
        raise ValueError("the seed set D is empty")
    start = (iteration - 1) * size
    out = []
    for position in range(start, start + size):
        epoch, index = divmod(position, len(seed))
        order = (np.arange(len(seed)) if epoch == 0
                 else np.random.default_rng([seed_value, epoch]).permutation(len(seed)))
        out.append(seed[int(order[index])])
    return out, (start + size - 1) // len(seed) + 1
