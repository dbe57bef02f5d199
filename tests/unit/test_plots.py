"""The run's plots: readable trends over noisy per-step signals, labelled axes, legends off the lines."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from launch import plots  # noqa: E402


def fake_rows(n=120):
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, n + 1):
        row = {"train/global_step": step, "rollout/reward_mean": float(rng.random()),
               "creator/batch_info_mean": float(rng.random() * 0.3),
               "creator/batch_informative_fraction": float(rng.random() * 0.5),
               "buffer/batch_difficulty/2": 4, "buffer/batch_difficulty/3": 4,
               "buffer/info_hist": {"edges": [0.0, 0.25, 0.5], "counts": [3, 5]}}
        if step % 40 == 0:
            row.update({"eval/accuracy": 0.3, "eval/accuracy_level_1": 1.0, "eval/accuracy_level_2": 0.9,
                        "eval/accuracy_level_3": 0.1})
        rows.append(row)
    return rows


def test_moving_average_stays_an_average_at_the_ends():
    values = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    assert np.allclose(plots.moving_average(values, 3), 1.0)
    assert np.allclose(plots.moving_average(np.arange(5.0), 3)[1:-1], [1.0, 2.0, 3.0])
    assert np.array_equal(plots.moving_average(np.arange(3.0), 1), np.arange(3.0))


def test_informativeness_shows_faint_raw_lines_under_their_moving_averages():
    fig, axes = plt.subplots(1, 2)
    plots.informativeness(fake_rows(), axes)
    assert axes[0].get_ylabel()  # the histogram says what it counts
    lines = axes[1].get_lines()
    raw = [ln for ln in lines if (ln.get_alpha() or 1.0) < 1.0]
    trend = [ln for ln in lines if (ln.get_alpha() or 1.0) == 1.0]
    assert len(raw) == 2 and len(trend) == 2
    assert all(ln.get_linewidth() > r.get_linewidth() for ln in trend for r in raw)
    # Smoothed: the trend varies far less from step to step than the raw signal.
    assert all(np.std(np.diff(t.get_ydata())) < 0.5 * np.std(np.diff(r.get_ydata())) for t, r in zip(trend, raw))
    assert [t.get_label() for t in trend] == [text.get_text() for text in axes[1].get_legend().get_texts()]
    plt.close(fig)


def test_the_learning_curve_legend_sits_outside_the_axes():
    fig, ax = plt.subplots(figsize=(8, 4))
    plots.learning_curve(fake_rows(), ax)
    fig.tight_layout()
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend.x0 >= axes_box.x1  # nothing it could cover
    assert fig.get_window_extent().x1 >= legend.x1  # and it is not cut off
    plt.close(fig)


def test_write_plots_draws_the_three_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in fake_rows()) + "\n")
    written = plots.write_plots(tmp_path)
    assert [p.name for p in written] == ["learning_curve.png", "curriculum.png", "informativeness.png"]
    assert all(p.stat().st_size > 0 for p in written)
