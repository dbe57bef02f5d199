"""PNG plots of a finished run, drawn from its own metrics.jsonl (so they can be redrawn for any run directory).

    python -m launch.plots runs/<run>          # writes learning_curve.png, curriculum.png, informativeness.png

- learning_curve.png: reward of the sampled responses per step and, in a world, held-out accuracy by level;
- curriculum.png: the difficulty mix of the prompts trained on at each step (the paper's curriculum figure);
- informativeness.png: the informativeness of the buffer's prompts at the end, and the minibatch mean over steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "creator/evolved_prompts" not in line]


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["train/global_step"], r[key]) for r in rows if r.get(key) is not None]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)) if pts else (np.array([]),) * 2


def learning_curve(rows: list[dict], ax) -> None:
    steps, reward = _series(rows, "rollout/reward_mean")
    ax.plot(steps, reward, color="0.6", lw=1, label="sampled reward (train)")
    levels = sorted({k for r in rows for k in r if k.startswith("eval/accuracy_level_")})
    for key in levels:
        ax.plot(*_series(rows, key), marker="o", label=f"held-out accuracy L{key.rsplit('_', 1)[1]}")
    if levels:
        ax.plot(*_series(rows, "eval/accuracy"), marker="s", color="black", label="held-out accuracy (all)")
    else:
        ax.plot(*_series(rows, "eval/win_rate"), marker="o", label="win-rate vs initial policy")
    ax.set_xlabel("learner step")
    ax.set_title("Learning curve")
    ax.legend(fontsize=7)


def curriculum(rows: list[dict], ax) -> None:
    keys = sorted({k for r in rows for k in r if k.startswith("buffer/batch_difficulty/")},
                  key=lambda k: int(k.rsplit("/", 1)[1]))
    if not keys:
        ax.text(0.5, 0.5, "no difficulty levels (not a world run)", ha="center", va="center")
        return
    steps = np.array([r["train/global_step"] for r in rows])
    counts = np.array([[r.get(k, 0) or 0 for k in keys] for r in rows], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    window = max(1, len(steps) // 40)  # a short moving average keeps the trend readable at minibatch 8
    kernel = np.ones(window)
    # Divide by the kernel's overlap so the average stays a share at the ends of the run, where fewer steps exist.
    norm = np.convolve(np.ones(len(steps)), kernel, mode="same")
    smooth = np.stack([np.convolve(shares[:, i], kernel, mode="same") / norm for i in range(len(keys))], axis=1)
    ax.stackplot(steps, smooth.T, labels=[f"level {k.rsplit('/', 1)[1]}" for k in keys])
    ax.set_ylim(0, 1)
    ax.set_xlabel("learner step")
    ax.set_ylabel("share of the minibatch")
    ax.set_title("Difficulty of the prompts trained on")
    ax.legend(fontsize=7, loc="upper left")


def informativeness(rows: list[dict], axes) -> None:
    last = next((r for r in reversed(rows) if r.get("buffer/info_hist", {}).get("counts")), None)
    if last:
        hist = last["buffer/info_hist"]
        edges = np.array(hist["edges"])
        axes[0].bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue")
    axes[0].set_title("Informativeness of the buffer's prompts (end)")
    axes[0].set_xlabel("informativeness")
    axes[1].plot(*_series(rows, "creator/batch_info_mean"), label="minibatch mean")
    axes[1].plot(*_series(rows, "creator/batch_informative_fraction"), label="share with reward spread")
    axes[1].set_title("Informativeness of the minibatch")
    axes[1].set_xlabel("learner step")
    axes[1].legend(fontsize=7)


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    written = []
    for name, draw, shape in (("learning_curve", learning_curve, (1, 1)), ("curriculum", curriculum, (1, 1)),
                              ("informativeness", informativeness, (1, 2))):
        fig, axes = plt.subplots(*shape, figsize=(6 * shape[1], 4))
        draw(rows, axes)
        fig.tight_layout()
        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_plots(sys.argv[1]):
        print(p)
