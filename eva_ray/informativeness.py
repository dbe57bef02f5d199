"""Prompt informativeness: how much the solver can still learn from a prompt, read off its own rewards.

eva (arXiv 2411.00062, section 3 and Tables 3-4) scores a prompt ``x`` by the *reward advantage* of the best of the
solver's ``n`` responses over a baseline, a proxy for the solver's regret on ``x``:

=================== ======================================== ==========================================
metric              score of one prompt (r = its n rewards)  role in the paper
=================== ======================================== ==========================================
``a_min``           ``max(r) - min(r)``                      A*_min, minimax regret; offline default
``a_avg``           ``max(r) - mean(r)``                     A*_avg, Bayesian regret; online default
``a_dis``           ``max(r) - second_max(r)``               A*_dis, min-margin regret
``reward_var``      ``var(r)`` (population, ddof=0)          heuristic baseline
``reward_mean``     ``mean(r)``                              heuristic baseline
``inv_reward_mean`` ``1 / (max(mean(r), 0) + eps)``          heuristic baseline (prefers low reward)
``inv_a_min``       ``1 / (a_min + eps)``                    ablation: prefers *uninformative* prompts
``uniform``         ``1``                                    ablation: no prioritisation
``learnability``    ``p (1 - p)``, ``p = clip(mean(r), 0, 1)`` not in eva: SFL's "learnability" (success
                                                             rate p of a 0/1 reward), highest at p = 1/2
=================== ======================================== ==========================================

Usage::

    scores = score_prompts(rewards, DEFAULT_METRIC["online"])   # rewards: [P prompts, N responses]
    scores.scores      # [P] float64, NaN where a prompt had no finite reward
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from numpy.typing import ArrayLike

METRICS: tuple[str, ...] = (
    "a_min",
    "a_avg",
    "a_dis",
    "reward_var",
    "reward_mean",
    "inv_reward_mean",
    "inv_a_min",
    "uniform",
    "learnability",
)

DEFAULT_METRIC: dict[str, str] = {"online": "a_avg", "offline": "a_min"}
"""The paper's baseline per mode: the mean reward online (A_avg), the min reward offline (A_min)."""

Rewards = Union[ArrayLike, Sequence[Sequence[float]]]


@dataclass(frozen=True)
class InfoScores:
    """Informativeness of a batch of prompts.

    Attributes:
        scores: ``[P]`` float64; NaN for a prompt with no finite reward (it has no score, not a zero score).
        n_valid: ``[P]`` int64, how many of each prompt's rewards were finite and used.
        n_dropped: total number of non-finite rewards (NaN, +-inf) that were dropped over the batch.
    """

    scores: np.ndarray
    n_valid: np.ndarray
    n_dropped: int


def _reward_matrix(rewards: Rewards) -> tuple[np.ndarray, int]:
    """Rewards as a float64 ``[P, N]`` matrix, padding ragged rows with NaN.

    Args:
        rewards: a ``[P, N]`` array, or a sequence of ``P`` one-dimensional sequences of possibly different lengths
            (prompts can end up with different numbers of valid responses).

    Returns:
        ``(matrix, n_entries)``: ``matrix`` is ``[P, N]`` float64 with ``N`` the longest row and NaN padding;
        ``n_entries`` counts the rewards actually given, so padding is never mistaken for a dropped reward.
    """
    if not isinstance(rewards, np.ndarray) and len(rewards) == 0:  # type: ignore[arg-type]
        return np.empty((0, 0)), 0  # an empty batch, not a malformed one
    if isinstance(rewards, np.ndarray) or not _is_ragged(rewards):
        matrix = np.asarray(rewards, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError(f"rewards must be [prompts, responses] (2-D), got shape {matrix.shape}")
        return matrix, matrix.size
    rows = [np.asarray(row, dtype=np.float64) for row in rewards]  # type: ignore[union-attr]
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"rewards row {i} must be one-dimensional, got shape {row.shape}")
    width = max(row.size for row in rows)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : row.size] = row
    return matrix, sum(row.size for row in rows)


def _is_ragged(rewards: Rewards) -> bool:
    """True for a sequence of rows that do not all have the same length."""
    try:
        lengths = {len(row) for row in rewards}  # type: ignore[arg-type, union-attr]
    except TypeError:
        return False  # scalars or a flat list: np.asarray then reports the shape problem
    return len(lengths) > 1


# Each metric maps (rewards [P, N] with NaN where invalid, valid mask [P, N], n_valid [P], eps) to scores [P].
# Rows with n_valid == 0 may come out as garbage (inf - inf); score_prompts overwrites them with NaN.
MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def _row_max(r: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.max(r, axis=1, where=valid, initial=-np.inf)


def _row_min(r: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.min(r, axis=1, where=valid, initial=np.inf)


def _row_mean(r: np.ndarray, valid: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    return np.sum(r, axis=1, where=valid) / np.maximum(n_valid, 1)


def _row_second_max(r: np.ndarray, valid: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
    """The second-largest valid reward per row, or the largest where a row has only one (so A_dis = 0 there)."""
    top = _row_max(r, valid)
    if r.shape[1] < 2:
        return top
    # Invalid entries sort below every real reward, so the second-largest of the padded row is the second-largest
    # valid reward whenever the row has at least two. np.partition is O(N) per row and keeps ties (a tie -> A_dis 0).
    padded = np.where(valid, r, -np.inf)
    second = np.partition(padded, r.shape[1] - 2, axis=1)[:, r.shape[1] - 2]
    return np.where(n_valid >= 2, second, top)


def _a_min(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return _row_max(r, valid) - _row_min(r, valid)


def _a_avg(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return _row_max(r, valid) - _row_mean(r, valid, n)


def _a_dis(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return _row_max(r, valid) - _row_second_max(r, valid, n)


def _reward_var(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    centred = r - _row_mean(r, valid, n)[:, None]
    return np.sum(centred * centred, axis=1, where=valid) / np.maximum(n, 1)


def _reward_mean(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return _row_mean(r, valid, n)


def _inv_reward_mean(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    # A negative mean is clipped to 0 so the score stays positive and bounded by 1/eps.
    return 1.0 / (np.maximum(_row_mean(r, valid, n), 0.0) + eps)


def _inv_a_min(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return 1.0 / (_a_min(r, valid, n, eps) + eps)


def _uniform(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    return np.ones(r.shape[0])


def _learnability(r: np.ndarray, valid: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    # The variance of a Bernoulli success: 0 where the solver always or never succeeds, largest at p = 1/2. Unlike
    # the advantages it does not favour a prompt solved once in N over one solved N/2 times.
    p = np.clip(_row_mean(r, valid, n), 0.0, 1.0)
    return p * (1.0 - p)


_METRIC_FNS: dict[str, MetricFn] = {
    "a_min": _a_min,
    "a_avg": _a_avg,
    "a_dis": _a_dis,
    "reward_var": _reward_var,
    "reward_mean": _reward_mean,
    "inv_reward_mean": _inv_reward_mean,
    "inv_a_min": _inv_a_min,
    "uniform": _uniform,
    "learnability": _learnability,
}
assert tuple(_METRIC_FNS) == METRICS


def score_prompts(rewards: Rewards, metric: str, *, inverse_eps: float = 1e-3) -> InfoScores:
    """Informativeness of each prompt from the rewards of its responses.

    Args:
        rewards: ``[P, N]`` float rewards (``P`` prompts, ``N`` responses each), or a ragged sequence of ``P``
            one-dimensional reward sequences. NaN and +-inf entries (a failed reward call, a parse error) are
            dropped and counted: they say nothing about the prompt, and one of them would poison max/mean.
        metric: one of :data:`METRICS`.
        inverse_eps: added to the denominator of the inverse metrics (``inv_reward_mean``, ``inv_a_min``). A prompt
            whose responses all got the same reward has zero advantage, and ``1 / 0`` would give it infinite
            priority; ``eps`` caps its score at ``1 / eps``. These metrics are the paper's ablations that prefer
            *uninformative* prompts (Table 4), kept for reproducing it.

    Returns:
        :class:`InfoScores` with ``scores [P]`` (NaN for a prompt with no finite reward), ``n_valid [P]`` and
        ``n_dropped``. Ragged padding is not counted as dropped.
    """
    if metric not in _METRIC_FNS:
        raise ValueError(f"unknown informativeness metric {metric!r}; allowed: {', '.join(METRICS)}")
    if not inverse_eps > 0:
        raise ValueError(f"inverse_eps must be > 0, got {inverse_eps}")
    r, n_entries = _reward_matrix(rewards)
    valid = np.isfinite(r)
    n_valid = valid.sum(axis=1)
    # Empty rows give inf - inf (invalid) and a reward range near the float limit can overflow; both are local to
    # a row whose score is either replaced by NaN below or legitimately infinite, so silence them here only.
    with np.errstate(invalid="ignore", over="ignore"):
        scores = _METRIC_FNS[metric](r, valid, n_valid, float(inverse_eps)).astype(np.float64)
    scores[n_valid == 0] = np.nan
    return InfoScores(scores=scores, n_valid=n_valid.astype(np.int64), n_dropped=int(n_entries - n_valid.sum()))

