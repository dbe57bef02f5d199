"""PNG plots of a finished run, drawn from its own metrics.jsonl (so they can be redrawn for any run directory).

    python -m launch.plots runs/<run>          # writes learning_curve.png, curriculum.png, informativeness.png

- learning_curve.png: reward of the sampled responses per step and, in a world, held-out accuracy by level;
- curriculum.png: the difficulty mix of the prompts trained on at each step (the paper's curriculum figure);
- informativeness.png: the informativeness of the buffer's prompts at the end, and the minibatch mean over steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from eva_ray.atomic import read_jsonl


def _rows(run_dir: Path) -> list[dict]:
    # A line torn by a crash or a full disk is skipped (read_jsonl counts it).
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "creator/evolved_prompts" not in row]


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["train/global_step"], r[key]) for r in rows if r.get(key) is not None]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)) if pts else (np.array([]),) * 2


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``values [n]`` that stays an average at the ends (divided by the kernel's overlap)."""
    if window <= 1 or values.size == 0:
        return values.astype(float)
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(values.size), kernel, mode="same")


def _window(n: int) -> int:
    # About 30 points per average: minibatch-8 signals are too noisy per step to read, a run's trend is not.
    return max(1, n // 30)


def learning_curve(rows: list[dict], ax) -> None:
    steps, reward = _series(rows, "rollout/reward_mean")
    window = _window(len(reward))
    ax.plot(steps, reward, color="0.6", lw=0.6, alpha=0.35)  # per step: 8 prompts, too noisy to read alone
    ax.plot(steps, moving_average(reward, window), color="0.35", lw=1.5,
            label=f"sampled reward (train, {window}-step avg.)")
    levels = sorted({k for r in rows for k in r if k.startswith("eval/accuracy_level_")})
    for key in levels:
        ax.plot(*_series(rows, key), marker="o", label=f"held-out accuracy L{key.rsplit('_', 1)[1]}")
    if levels:
        ax.plot(*_series(rows, "eval/accuracy"), marker="s", color="black", label="held-out accuracy (all)")
    else:
        ax.plot(*_series(rows, "eval/win_rate"), marker="o", label="win-rate vs initial policy")
    ax.set_xlabel("learner step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Learning curve")
    # Outside the axes: inside, seven entries cover the accuracy lines wherever they are put.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


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
    smooth = np.stack([moving_average(shares[:, i], window) for i in range(len(keys))], axis=1)
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
    else:
        axes[0].text(0.5, 0.5, "buffer empty at the end", ha="center", va="center", transform=axes[0].transAxes)
    axes[0].set_title("Informativeness of the buffer's prompts (end)")
    axes[0].set_xlabel("informativeness")
    axes[0].set_ylabel("prompts in the buffer")
    window = 1
    for key, label, color in (("creator/batch_info_mean", "minibatch mean informativeness", "tab:blue"),
                              ("creator/batch_informative_fraction", "share with reward spread", "tab:orange")):
        steps, values = _series(rows, key)
        window = _window(len(values))
        # The per-step values of 8 prompts jump around; faint, with the trend drawn over them.
        axes[1].plot(steps, values, color=color, lw=0.6, alpha=0.25)
        axes[1].plot(steps, moving_average(values, window), color=color, lw=1.8, label=label)
    axes[1].set_title(f"Minibatch informativeness (faint: per step; bold: {window}-step avg.)")
    axes[1].set_xlabel("learner step")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=7, loc="upper right")


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    written = []
    # The learning curve is wider: its legend sits to the right of the axes.
    for name, draw, shape, size in (("learning_curve", learning_curve, (1, 1), (8, 4)),
                                    ("curriculum", curriculum, (1, 1), (6, 4)),
                                    ("informativeness", informativeness, (1, 2), (12, 4))):
        fig, axes = plt.subplots(*shape, figsize=size)
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
