"""Preference pairs from an offline iteration's scored responses, and SPPO's win probabilities.

Each prompt's k responses give one pair, its best and worst response by reward (the paper's y+ and y-), under the
rule the online OAIF loss uses (:func:`eva_ray.losses.dpo.select_preference_pairs`: non-finite rewards ignored, a
prompt whose rewards all tie gives no pair).

SPPO (Wu et al. 2024, arXiv 2405.00675) trains each response toward its probability of beating the current policy,
``P(y > pi | x)``, estimated from the same k responses as the mean of ``P(y > y_j)`` over all k (itself included,
at 1/2). From pointwise rewards ``P(y_i > y_j) = sigmoid(r_i - r_j)`` (Bradley-Terry); a pairwise reward model gives
the matrix directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    chosen: int
    """Index of y+ among the prompt's responses."""
    rejected: int


def best_worst_pairs(rewards: Sequence[Sequence[float]]) -> list[Pair]:
    """One best-vs-worst pair per prompt that shows a preference, in prompt order."""
    import torch

    from eva_ray.losses.dpo import select_preference_pairs

    out: list[Pair] = []
    for index, row in enumerate(rewards):  # rows may differ in length: one prompt at a time
        chosen, rejected, valid = select_preference_pairs(torch.tensor([list(row)], dtype=torch.float64))
        if bool(valid[0]):
            out.append(Pair(index, int(chosen[0]), int(rejected[0])))
    return out


def bradley_terry_matrix(rewards: Sequence[float]) -> np.ndarray:
    """``P[i, j] = sigmoid(r_i - r_j)``; a non-finite reward loses to every finite one and ties the others."""
    r = np.asarray(rewards, dtype=float)
    finite = np.isfinite(r)
    diff = np.subtract.outer(np.where(finite, r, 0.0), np.where(finite, r, 0.0))
    p = 1.0 / (1.0 + np.exp(-np.clip(diff, -500, 500)))
    p[np.ix_(finite, ~finite)] = 1.0
    p[np.ix_(~finite, finite)] = 0.0
    p[np.ix_(~finite, ~finite)] = 0.5
    return p


def win_probabilities(matrix: np.ndarray) -> np.ndarray:
    """``P(y_i > pi)``: the mean of row i of a k x k win matrix whose diagonal is taken as 1/2."""
    m = np.array(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a win matrix is k x k, got shape {m.shape}")
    np.fill_diagonal(m, 0.5)
    if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
        raise ValueError("win probabilities must be finite and in [0, 1]")
    return m.mean(axis=1)
