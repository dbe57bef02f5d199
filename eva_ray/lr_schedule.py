"""The learning-rate schedule: a linear warm-up, then constant, linear or cosine decay, as a factor per update."""

from __future__ import annotations

import math
from collections.abc import Callable

LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
OPTIMIZERS: tuple[str, ...] = ("adamw", "rmsprop")
"""The learner's optimizers (``learner.optimizer``): AdamW, or RMSprop (SPPO's published recipe)."""


def lr_multiplier(schedule: str, total_updates: int, warmup_ratio: float) -> Callable[[int], float]:
    """The factor on the peak learning rate used by optimizer update ``k`` (0-based), for ``torch``'s ``LambdaLR``.

    Warm-up: ``warmup = ceil(warmup_ratio * total_updates)`` updates with factor ``(k + 1) / warmup``, so the first
    update already moves the weights (HF's ``k / warmup`` spends update 0 at lr 0) and update ``warmup - 1`` runs
    at the peak. Then, with ``d = (k - warmup) / (total_updates - warmup)``: ``constant`` 1, ``linear`` ``1 - d``,
    ``cosine`` ``(1 + cos(pi d)) / 2``. Past ``total_updates`` the factor stays at its final value, never negative.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; allowed: {list(LR_SCHEDULES)}")
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    warmup = math.ceil(warmup_ratio * total_updates)
    decay = max(1, total_updates - warmup)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        d = min(1.0, (k - warmup) / decay)
        if schedule == "linear":
            return 1.0 - d
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * d))
        return 1.0

    return factor


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup: int, horizon: int) -> float:
    """The learning rate of ``step`` (0-based) in the solvers' pretraining scripts: a linear warm-up to ``lr`` over
    ``warmup`` steps, then cosine to ``min_lr`` at ``horizon``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
