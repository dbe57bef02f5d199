"""The last line of a world run's summary: this run next to the experiment's arms at the same rollouts.

``scripts/experiment.py`` writes ``docs/experiment-<world>.json`` with every run's held-out accuracy against the
rollouts it had spent. A run of the same world and KL coefficient is put next to the mean of each reference arm
(static D, fresh prompts at every level, eva) at its own rollout count, read off each reference run's curve at the
last evaluation that had not spent more. Nothing is printed when the file or a comparable arm is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"
REFERENCE_ARMS = ("static", "uniform_all", "eva_steer", "eva")


def reference_file(world: str) -> Path:
    return DOCS / f"experiment-{world}.json"


def accuracy_at(curve: list[list[float]], rollouts: int) -> float | None:
    """Accuracy at the last evaluation of ``curve`` (``[rollouts, accuracy, ...]`` rows) within ``rollouts``."""
    seen = [row[1] for row in curve if row[0] <= rollouts]
    return seen[-1] if seen else None


def comparison_line(world: str, beta: float, rollouts: int, accuracy: float, path: Path | None = None) -> str | None:
    """One line: this run's held-out accuracy and each reference arm's mean at the same rollouts, or None."""
    path = reference_file(world) if path is None else path
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    by_arm: dict[str, list[float]] = {}
    for run in report.get("runs", []):
        arm, _, swept = str(run.get("arm", "")).partition(" ")
        run_beta = _beta(swept, run.get("overrides", []))
        curve = run.get("curve_rollouts_accuracy_expected")
        if arm not in REFERENCE_ARMS or run_beta is None or abs(run_beta - beta) > 1e-12 or not curve:
            continue
        value = accuracy_at(curve, rollouts)
        if value is not None:
            by_arm.setdefault(arm, []).append(value)
    if not by_arm:
        return None
    parts = [f"{arm} {sum(v) / len(v):.3f} ({len(v)} seeds)" for arm in REFERENCE_ARMS if (v := by_arm.get(arm))]
    return (f"  at {rollouts:,} rollouts this run's held-out accuracy is {accuracy:.3f}; the experiment's arms at "
            f"the same rollouts and KL {beta:g}: {', '.join(parts)} ({path.name})")


def _beta(swept: str, overrides: list[str]) -> float | None:
    """The run's solver.beta: from its sweep cell, else its overrides; None when it was the config's own."""
    for item in [swept, *reversed(overrides)]:
        key, _, value = item.partition("=")
        if key == "solver.beta":
            try:
                return float(value)
            except ValueError:
                return None
    return None
