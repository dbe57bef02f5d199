"""Choosing k prompts out of n by informativeness: weighted sampling without replacement, or top-k.

``sample`` (the default) draws ``k`` distinct items, each next one with probability proportional to its weight
among those not yet drawn. It uses exponential keys (Efraimidis & Spirakis, 2006): item ``i`` gets the key
``E_i / w_i`` with ``E_i ~ Exp(1)`` and the ``k`` smallest keys win, which is exactly sequential weighted sampling
without replacement in one vectorised O(n) pass. ``greedy`` takes the ``k`` largest weights.

Weights are priorities, never min-max normalised: min-max maps the lowest-weight item to 0 and so makes it
unsamplable forever, even when it is barely below the rest. Zero weight does mean "never while anything else is
left": when fewer than ``k`` items have positive weight, the remaining slots are filled uniformly at random from the
zero-weight items, so an all-zero weight vector falls back to uniform sampling.

Usage::

    rng = np.random.default_rng(42)
    idx = select_indices(scores, k=4, mode="sample", rng=rng)   # [4] distinct int64 indices into scores
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

SAMPLING_MODES: tuple[str, ...] = ("sample", "greedy")


def clean_weights(weights: ArrayLike) -> np.ndarray:
    """Weights as float64 ``[n]`` with NaN and negative entries set to 0.

    NaN means "no score" (a prompt whose rewards were all invalid) and a negative score can come from metrics such
    as ``reward_mean``; neither is a meaningful sampling priority, so both become 0: such items are drawn only when
    the positive-weight items run out. ``+inf`` has no proportional share and is rejected with ``ValueError``.
    An already-clean float64 input is returned as is, not copied.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be one-dimensional, got shape {w.shape}")
    unusable = ~(w >= 0)  # NaN fails every comparison, so this one pass finds NaN and negatives
    if unusable.any():
        w = np.where(unusable, 0.0, w)
    if w.size and w.max() == np.inf:
        raise ValueError("weights contain +inf; an infinite priority cannot be turned into a probability")
    return w


def select_indices(
    weights: ArrayLike, k: int, *, mode: str = "sample", rng: np.random.Generator
) -> np.ndarray:
    """Pick ``k`` distinct indices into ``weights``.

    Args:
        weights: ``[n]`` priorities; NaN and negative entries count as 0 (see :func:`clean_weights`).
        k: how many to pick, ``0 <= k <= n``. Asking for more than ``n`` is an error rather than a silent clamp,
            which would hand the caller a smaller batch than it planned for.
        mode: ``"sample"`` (weighted, without replacement) or ``"greedy"`` (top-k, ties broken at random).
        rng: the only source of randomness, so a seeded generator makes the result reproducible.

    Returns:
        ``[k]`` int64 indices, distinct, in the order they were drawn (``greedy``: by decreasing weight).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; allowed: {', '.join(SAMPLING_MODES)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    w = clean_weights(weights)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if k > w.size:
        raise ValueError(f"cannot select {k} distinct items out of {w.size}")
    if mode == "greedy":
        return _top_k_random_ties(w, int(k), rng)
    keys = np.full(w.size, -np.inf)
    if w.max(initial=0.0) > 0:
        # Scaling by the largest weight keeps E / w finite for any weight ratio a double can resolve; a weight that
        # underflows to 0 here, or whose key overflows to -inf, is below 1e-308 of the largest and is treated as
        # zero, which its probability already is in double precision. Negating turns "smallest key wins" into the
        # "largest wins" of the shared top-k helper. Zero-weight items keep the key -inf and so tie with each
        # other: the helper breaks that tie uniformly, which is the fallback to uniform sampling.
        # (One exponential is drawn per item, zero weights included: a masked divide is several times faster at
        # 100k items than gathering and scattering the positive ones.)
        scaled = w / w.max()
        positive = scaled > 0
        with np.errstate(over="ignore"):
            np.divide(rng.standard_exponential(w.size), scaled, out=keys, where=positive)
        np.negative(keys, out=keys, where=positive)
    return _top_k_random_ties(keys, int(k), rng)


def _top_k_random_ties(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``k`` largest of ``values [n]``, decreasing; a tie at the cut is broken uniformly at random.

    O(n) (one partition) plus O(k log k) for ordering, so it stays cheap on a 100k-entry buffer.
    """
    n = values.size
    if k == 0:
        return np.empty(0, dtype=np.int64)
    cut = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > cut)
    above = above[np.argsort(-values[above], kind="stable")]
    tied = np.flatnonzero(values == cut)
    need = k - above.size
    if need < tied.size:
        tied = rng.choice(tied, size=need, replace=False)
    return np.concatenate([above, tied]).astype(np.int64)
