"""The default `eva-ray run` (the cipher world) and the chain_sum proving ground, shortened: they run, evaluate by
level and plot."""

import json

import pytest

from launch.cli import DEFAULT_RUN, main


@pytest.mark.slow
def test_default_run_evaluates_by_level_evolves_by_difficulty_and_plots(tmp_path, tiny_cache, monkeypatch, capsys):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    code = main(["run", "--inline", "--config", "configs/chain_sum.yaml", f"run.output_dir={tmp_path}",
                 "run.total_steps=30", "world.seed_size=120",
                 "world.eval_per_level=20", "creator.capacity=48", "logging.eval_every=15",
                 "logging.progress=false"])
    out = capsys.readouterr().out
    assert code == 0 and DEFAULT_RUN.is_file()
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["phases"][0] == "warm-up" and "mix-up" in summary["phases"]
    for acc in (summary["eval_start"], summary["eval"]):
        assert set(acc) >= {"accuracy", *(f"accuracy_level_{d}" for d in range(1, 6))}
    # The shipped solver: level 1 always solved, level 5 never (the world's always / never ends).
    assert summary["eval_start"]["accuracy_level_1"] >= 0.9 and summary["eval_start"]["accuracy_level_5"] == 0.0
    composition = summary["final"]["buffer_by_generation_and_difficulty"]
    assert composition and all("/d" in key for key in composition)
    creator = summary["final"]["creator"]
    assert creator["evolve_ok"] > 0 and creator["llm_calls"] == 0  # the curriculum evolves without an LLM
    assert "held-out accuracy: start" in out and "end" in out
    for name in ("learning_curve", "curriculum", "informativeness"):
        assert (run_dir / f"{name}.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/global_step"] == 0 and "eval/accuracy_level_3" in rows[0]  # the curve's starting point
    assert any(k.startswith("buffer/batch_difficulty/") for k in rows[1])


@pytest.mark.slow
def test_default_run_is_the_cipher_world_and_reports_expected_accuracy_and_health(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code = main(["run", "--inline", f"run.output_dir={tmp_path}", "run.total_steps=24", "world.eval_per_level=20",
                 "logging.eval_every=12", "logging.health_window=8", "logging.progress=false"])
    out = capsys.readouterr().out
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 24 and summary["error"] is None
    levels = range(1, 7)
    for acc in (summary["eval_start"], summary["eval"]):
        assert set(acc) >= {"accuracy", *(f"accuracy_level_{d}" for d in levels),
                            *(f"expected_accuracy_level_{d}" for d in levels)}
    # The shipped solver copies its input: nothing is solved greedily, and pi(answer) falls about 13x per mark.
    start = summary["eval_start"]
    assert start["accuracy"] == 0.0
    assert start["expected_accuracy_level_1"] > 5 * start["expected_accuracy_level_2"] > 0
    health = summary["health"]
    assert set(health) >= {"coverage", "spread_fraction_window", "info_learnability_corr", "starving", "uncovered"}
    assert "creator health (last window)" in out and "expected sampled accuracy" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("health/coverage" in row for row in rows)
