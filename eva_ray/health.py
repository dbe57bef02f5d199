"""Creator health: is the prompt distribution still teaching the solver, and is it still covering the world?

Three signals over a window of recent steps, logged as ``health/*`` and summarised at the end of a run:

- ``spread_fraction``: share of trained prompts whose responses got different rewards. A prompt without a spread
  gives RLOO no gradient, so a creator that keeps choosing them is spending rollouts for nothing.
- ``coverage``: share of the world's skill units (:meth:`~eva_ray.worlds.base.World.skill_units`; in the cipher
  world, each letter marked in an easy prompt) that the window's prompts exercised. A buffer that stops replaying a
  unit starves it: what the solver knew about it decays while nothing measures it.
- ``info_learnability_corr`` and ``info_success_corr``: Pearson correlation, over the window's prompts, of the
  creator's informativeness score with the learnability ``p (1 - p)`` and with the success rate ``p`` (mean reward
  clipped to [0, 1]). SFL ("No Regrets", arXiv 2408.15099) warns that regret proxies can end up tracking the success
  rate instead of learnability; a correlation with ``p`` near the one with ``p (1 - p)`` shows it.

``starving`` is 1 when coverage is below ``starve_below`` (default one half) once the window is full. Ray-free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from eva_ray.records import PromptRecord


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation, NaN when either side is constant or there are fewer than three points."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


class CreatorHealth:
    """Rolling health metrics of the trained prompts; ``world`` gives the skill units (None: no coverage)."""

    def __init__(self, world: Any = None, *, window: int = 20, starve_below: float = 0.5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.world = world
        self.window = window
        self.starve_below = starve_below
        self.units: tuple[str, ...] = tuple(world.all_skill_units()) if world is not None else ()
        self._steps: deque[dict[str, Any]] = deque(maxlen=window)

    def update(self, prompts: Sequence[PromptRecord], rewards: Sequence[Sequence[float]],
               scores: Sequence[float]) -> dict[str, float]:
        """Add one step (its prompts, their rewards and the creator's informativeness scores); return the metrics."""
        r = [np.asarray(row, dtype=float) for row in rewards]
        p = np.array([np.clip(np.nanmean(row), 0, 1) if np.isfinite(row).any() else np.nan for row in r])
        spread = np.array([np.ptp(row[np.isfinite(row)]) > 0 if np.isfinite(row).sum() > 1 else False for row in r])
        units: set[str] = set()
        if self.world is not None:
            for prompt in prompts:
                try:
                    units |= self.world.skill_units(prompt)
                except ValueError:  # not a task of this world (a seed file row): it covers nothing
                    pass
        self._steps.append({"p": p, "spread": spread, "info": np.asarray(scores, dtype=float), "units": units})
        return self.metrics(step_spread=float(spread.mean()) if spread.size else 0.0)

    def metrics(self, step_spread: float | None = None) -> dict[str, float]:
        if not self._steps:
            return {}
        p = np.concatenate([s["p"] for s in self._steps])
        info = np.concatenate([s["info"] for s in self._steps])
        spread = np.concatenate([s["spread"] for s in self._steps])
        out = {"spread_fraction_window": float(spread.mean()) if spread.size else 0.0,
               "info_learnability_corr": _corr(info, p * (1 - p)), "info_success_corr": _corr(info, p)}
        if step_spread is not None:
            out["spread_fraction"] = step_spread
        if self.units:
            covered = set().union(*(s["units"] for s in self._steps))
            out["coverage"] = len(covered & set(self.units)) / len(self.units)
            out["starving"] = float(len(self._steps) == self.window and out["coverage"] < self.starve_below)
        return out

    def uncovered(self) -> list[str]:
        """The skill units no prompt of the window exercised."""
        covered = set().union(*(s["units"] for s in self._steps)) if self._steps else set()
        return [u for u in self.units if u not in covered]
