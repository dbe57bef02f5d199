"""A progress line per step: where the run is, how fast it goes, when it ends, and the numbers worth watching."""

from __future__ import annotations

import time
from typing import Any, Callable


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, echo: Callable[[str], None] = print) -> None:
        self.total = total
        self.enabled = enabled
        self.echo = echo
        self.start = time.monotonic()

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        elapsed = time.monotonic() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        buffer, creator = metrics.get("buffer", {}), metrics.get("creator", {})
        train, rollout = metrics.get("train", {}), metrics.get("rollout", {})
        phase = ("warm-up", "mix-up", "bootstrap")[buffer.get("phase", 0)]
        parts = [
            f"step {step}/{self.total}", f"[{phase}]",
            f"reward {_fmt(rollout.get('reward_mean', float('nan')))}",
            "loss skipped (no reward spread)" if train.get("skipped") else f"loss {_fmt(train.get('loss', float('nan')))}",
            f"buffer {buffer.get('size', 0)}/{buffer.get('capacity', 0)}",
            f"evolve ok {creator.get('evolve_ok', 0)} rej {creator.get('evolve_rejected_total', 0)} "
            f"fail {creator.get('evolve_failed_total', 0)}"
            # Batches still at the evolve LLM: with a slow model (SmolLM2 on CPU takes minutes) this says the creator
            # is working while ok/rej/fail, counted when a batch returns, stay at 0.
            + (f" pending {creator['in_flight']}" if creator.get("in_flight") else ""),
        ]
        if "eval" in metrics:
            parts.append(f"win-rate {_fmt(metrics['eval']['win_rate'])}")
        parts.append(f"| {rate:.2f} step/s, {_clock(elapsed)} elapsed, ETA {_clock(eta) if eta != float('inf') else '?'}")
        return " ".join(parts)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self.enabled:
            self.echo(self.line(step, metrics))
