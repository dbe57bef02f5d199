"""Small, sink-independent metric values: a histogram that stays the same size however large the buffer grows."""

from __future__ import annotations

from typing import Any

import numpy as np

HIST_TAG = "__histogram__"


def histogram(values: Any, *, bins: int = 20, integer: bool = False) -> dict[str, Any]:
    """Counts and bin edges of ``values``: logged as a wandb histogram, stored as two short lists in JSONL.

    ``integer=True`` gives one bin per integer value (generation depths, difficulty levels).
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {HIST_TAG: True, "counts": [], "edges": []}
    if integer:
        lo, hi = int(arr.min()), int(arr.max())
        edges = np.arange(lo, hi + 2) - 0.5
    else:
        edges = bins
    counts, edges = np.histogram(arr, bins=edges)
    return {HIST_TAG: True, "counts": counts.tolist(), "edges": edges.tolist()}


def is_histogram(value: Any) -> bool:
    return isinstance(value, dict) and value.get(HIST_TAG) is True


# How each train/ metric of a learner rank combines into the global one (see reduce_rank_metrics).
# Loss statistics that count something (OAIF's preference pairs): they add up over micro-batches and ranks.
COUNT_STATS = ("n_pairs",)
_SUMMED = {"train/tokens", "train/sequences", *(f"train/{k}" for k in COUNT_STATS)}
_SHARED = {"train/version", "train/lr", "train/updates", "train/skipped", "train/grad_norm", "train/nonfinite_loss",
           "train/nonfinite_grad"}
_WEIGHT_OF = {"train/spread_fraction": "prompts", "train/reward_mean": "rewards", "train/staleness_mean": "sequences"}


def reduce_rank_metrics(ranks: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """The global metrics of one learner step from every rank's ``(metrics, weights)``.

    Counts add up; decisions the ranks took together (version, lr, updates, skipped, grad norm, non-finite counts)
    are rank 0's; maxima (``*_max``, ``timing/*``: the slowest rank is the step's time) take the largest; every other
    value is a mean weighted by what it averages over on each rank (``weights``: ``prompts``, ``rewards``,
    ``sequences``, ``units`` of the loss), which for the loss itself is exactly the one-rank value on the whole
    batch. A rank that lacks a metric (a padding rank never computes loss statistics) or has weight 0 is left out.
    """
    out: dict[str, float] = {}
    keys = list(dict.fromkeys(k for metrics, _ in ranks for k in metrics))
    for key in keys:
        present = [(m[key], w) for m, w in ranks if key in m]
        if key in _SHARED:
            out[key] = ranks[0][0].get(key, present[0][0])
        elif key in _SUMMED:
            out[key] = float(sum(v for v, _ in present))
        elif key.endswith("_max") or key.startswith("timing/"):
            out[key] = float(max(v for v, _ in present))
        else:
            weighted = [(v, w[_WEIGHT_OF.get(key, "units")]) for v, w in present]
            total = sum(w for v, w in weighted if w > 0 and np.isfinite(v))
            out[key] = (float(sum(v * w for v, w in weighted if w > 0 and np.isfinite(v)) / total) if total
                        else float("nan"))
    return out


def weighted_means(items: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Per key, the mean of its values weighted by their item's weight: how the learner combines the loss
    statistics of its micro-batches, each weighted by its loss units. A non-finite value makes the mean NaN (a NaN
    loss in one micro-batch must show), as does a total weight of 0. Counts (``COUNT_STATS``) are summed."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for values, _ in items for k in values):
        pairs = [(values[key], w) for values, w in items if key in values and w > 0]
        if key in COUNT_STATS:
            out[key] = float(sum(v for v, _ in pairs))
            continue
        total = sum(w for _, w in pairs)
        out[key] = float(sum(v * w for v, w in pairs) / total) if total else float("nan")
    return out
