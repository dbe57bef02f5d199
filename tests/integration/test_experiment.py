"""scripts/experiment.py end to end on a tiny world: two arms, one seed, a few steps; report, plot, resume."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiment.py"


def load_experiment():
    spec = importlib.util.spec_from_file_location("experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_experiment_reports_arms_plots_and_skips_finished_runs(tmp_path, tiny_cache, monkeypatch, capsys):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    experiment = load_experiment()
    out, runs = tmp_path / "out", tmp_path / "runs"
    # Few steps: on 2 shared cores a default-config step takes seconds; eval_every=2 still gives a learning curve.
    argv = ["--arms", "eva,static", "--seeds", "1", "--steps", "4", "--out", str(out), "--runs-dir", str(runs),
            "--quiet", "world.seed_size=120", "world.eval_per_level=20", "creator.capacity=48",
            "logging.eval_every=2"]
    assert experiment.main(argv) == 0
    md = (out / "experiment.md").read_text()
    assert "--steps 4" in md and "seeds (run.seed): 0" in md and "## What the numbers show" in md
    for arm in ("eva", "static"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} | 1 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        float(cells[2]), float(cells[3]), float(cells[4])  # start, final, delta are numbers
        assert 0.0 <= float(cells[5]) <= 1.0  # share of trained prompts with reward spread
    assert (out / "experiment.png").stat().st_size > 10_000
    index = json.loads((runs / "index.json").read_text())
    assert sorted(rec["arm"] for rec in index.values()) == ["eva", "static"]
    by_arm = experiment.collect(list(index.values()))
    assert [step for step, _ in by_arm["eva"][0]["curve"]] == [0, 2, 4]

    capsys.readouterr()
    assert experiment.main(argv) == 0  # everything done: nothing runs again
    log = capsys.readouterr().out
    assert log.count("experiment: skip") == 2 and "experiment: run " not in log
    assert len([p for p in runs.glob("*/*") if p.is_dir()]) == 2

    # A report under another name; the recorded command is still the one that runs. A reading written by hand at
    # the end of the report survives regenerating it.
    assert experiment.main([*argv, "--report-only", "--name", "probe"]) == 0
    report = out / "probe.md"
    report.write_text(report.read_text() + "\n## Reading\n\nThe gap is noise.\n")
    assert experiment.main([*argv, "--report-only", "--name", "probe"]) == 0
    md = report.read_text()
    assert md.count("## Reading") == 1 and md.endswith("## Reading\n\nThe gap is noise.\n")
    assert "](probe.png)" in md and (out / "probe.png").is_file()
    assert "--report-only" not in md and "--name probe" in md


def test_a_run_that_stops_early_is_reported_and_not_rerun(tmp_path, monkeypatch, capsys):
    experiment = load_experiment()
    calls = []

    def starving_run(config, arm, seed, steps, overrides, runs_dir, **_):
        # What the driver leaves behind when the creator starves: a run directory whose summary has the error.
        calls.append(arm)
        run_dir = runs_dir / arm / f"{arm}-seed{seed}-steps{steps}-20260101-000000"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({
            "steps_done": 7, "error": "CreatorStarved: step 7: D is used up", "eval": {"accuracy": 0.25}}))
        raise RuntimeError("CreatorStarved: step 7: D is used up")

    monkeypatch.setattr(experiment, "run_one", starving_run)
    argv = ["--arms", "inverse", "--seeds", "1", "--steps", "9", "--out", str(tmp_path), "--runs-dir",
            str(tmp_path / "runs")]
    assert experiment.main(argv) == 1  # nothing finished: nothing to report, and the caller is told
    assert calls == ["inverse"]
    index = json.loads((tmp_path / "runs" / "index.json").read_text())
    (rec,) = index.values()
    assert rec["steps_done"] == 7 and rec["accuracy_at_stop"] == 0.25 and rec["error"].startswith("CreatorStarved")
    capsys.readouterr()
    experiment.main(argv)
    assert calls == ["inverse"] and "stopped early before" in capsys.readouterr().out  # not run again
    experiment.main([*argv, "--retry-failed"])
    assert calls == ["inverse", "inverse"]

    # Next to a finished arm, the stopped run gets its own table.
    by_arm = {"eva": [{"seed": 0, "wall_s": 1.0, "start": {"accuracy": 0.2}, "final": {"accuracy": 0.3},
                       "curve": [(0, 0.2), (9, 0.3)], "informative": 0.5}]}
    args = experiment.parse_args(argv)
    experiment.write_markdown(tmp_path / "r.md", by_arm, args, "cmd", [rec])
    md = (tmp_path / "r.md").read_text()
    assert "## Runs that stopped early" in md and "| inverse | 0 | 7 | 0.250 | CreatorStarved: step 7" in md


OFFLINE_SCRIPT = SCRIPT.with_name("experiment_offline.py")


@pytest.mark.slow
def test_offline_experiment_reports_the_arms_at_their_cost_and_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("experiment_offline", OFFLINE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--name", "offline-test", "--losses", "dpo", "--arms", "static,eva,static_long", "--seeds", "1",
            "--out", str(out), "--runs-dir", str(runs), "offline.iterations=2", "offline.prompts_per_iteration=48",
            "offline.shard_prompts=48", "world.eval_per_level=5", "world.seed_size=200"]
    assert module.main(argv) == 0
    report = json.loads((out / "offline-test.json").read_text())["cells"]["dpo"]
    # Responses per run: static 2 passes of 48 x 6, eva 3 (the informativeness pass), static_long 3 iterations.
    assert report["static"]["responses"] == [2 * 48 * 6]
    assert report["eva"]["responses"] == report["static_long"]["responses"] == [3 * 48 * 6]
    assert len(report["eva"]["curves"]["expected_accuracy"][0]) == 3  # the start and two iterations
    md = (out / "offline-test.md").read_text()
    assert "| eva |" in md and "| static_long |" in md and (out / "offline-test.png").stat().st_size > 0
    capsys.readouterr()
    assert module.main(argv) == 0  # every run is finished: nothing runs again
    assert "done in" not in capsys.readouterr().out
