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
