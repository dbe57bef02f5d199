"""scripts/experiment.py's JSON report, from run directories written by hand (nothing is trained)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiment.py"


def load_experiment():
    spec = importlib.util.spec_from_file_location("experiment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(runs: Path, arm: str, seed: int, steps: int, *, start: float, final: float, probe: int | None,
             budget: int = 0, steps_done: int | None = None):
    run_dir = runs / arm / f"{arm}-seed{seed}-steps{steps}-x"
    run_dir.mkdir(parents=True)
    levels = {f"accuracy_level_{d}": final / d for d in (1, 2, 3, 4, 5)}
    steps, cap = steps if steps_done is None else steps_done, steps
    (run_dir / "summary.json").write_text(json.dumps({
        "steps_done": steps, "error": None, "interrupted": False, "rollouts": steps * 64 + (probe or 0),
        "eval_start": {"accuracy": start, **{f"accuracy_level_{d}": start for d in (1, 2, 3, 4, 5)}, "win_rate": 0.5},
        "eval": {"accuracy": final, **levels, "win_rate": 0.6, "n_prompts": 30}}))
    rows = [{"train/global_step": t, "train/spread_fraction": 0.25 if t % 2 else 0.75} for t in range(1, steps + 1)]
    if probe is not None:  # the creator's running count of rollouts, probes included
        for t, row in enumerate(rows, 1):
            row["creator/rollouts_total"] = t * 64 + probe
    rows[-1]["eval/accuracy"] = final
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run_dir / "config.yaml").write_text("creator:\n  batch_size: 8\nsolver:\n  n_responses: 8\n"
                                         f"run:\n  total_rollouts: {budget}\n")
    return {"arm": arm, "seed": seed, "steps": cap, "overrides": ["learner.lr=3e-5"], "run_dir": str(run_dir),
            "wall_s": 12.0}


def test_the_json_report_lists_every_run_with_its_accuracy_spread_steps_and_rollouts(tmp_path):
    experiment = load_experiment()
    runs, out = tmp_path / "runs", tmp_path / "out"
    recs = [fake_run(runs, "eva", 0, 4, start=0.3, final=0.4, probe=None),
            fake_run(runs, "probe", 0, 4, start=0.3, final=0.5, probe=40)]
    for rec in recs:
        experiment.save_run(runs, experiment.run_key(rec["arm"], rec["seed"], 4, rec["overrides"]), rec)
    failed = {"arm": "static", "seed": 0, "steps": 4, "error": "CreatorStarved: ...", "steps_done": 2,
              "accuracy_at_stop": 0.31}
    experiment.save_run(runs, experiment.run_key("static", 0, 4, ["learner.lr=3e-5"]), failed)
    argv = ["--arms", "eva,static,probe", "--seeds", "1", "--steps", "4", "--out", str(out), "--runs-dir", str(runs),
            "--report-only", "learner.lr=3e-5"]
    assert experiment.main(argv) == 1  # a run stopped early
    report = json.loads((out / "experiment.json").read_text())
    assert report["command"].startswith("python scripts/experiment.py --arms eva,static,probe")
    assert "--report-only" not in report["command"]
    eva, probe = report["runs"]
    assert (eva["arm"], eva["seed"], eva["steps"], probe["arm"]) == ("eva", 0, 4, "probe")
    assert eva["overrides"] == ["learner.lr=3e-5"]
    assert probe["overrides"] == ["learner.lr=3e-5", "creator.child_scoring=probe"]
    assert eva["start"] == {"accuracy": 0.3, **{f"accuracy_level_{d}": 0.3 for d in range(1, 6)}}  # no win-rate
    assert eva["final"] == {"accuracy": 0.4, **{f"accuracy_level_{d}": 0.4 / d for d in range(1, 6)}}
    assert eva["spread_share"] == 0.5
    assert eva["rollouts"] == 4 * 8 * 8  # no count logged: steps x batch x responses
    assert probe["rollouts"] == 4 * 64 + 40  # as the creator counted them, probes included
    assert report["stopped_early"] == [{"arm": "static", "seed": 0, "steps": 4, "steps_done": 2,
                                        "accuracy_at_stop": 0.31, "error": "CreatorStarved: ..."}]
    assert (out / "experiment.md").is_file()


def test_probe_is_an_arm_but_not_a_default_one():
    experiment = load_experiment()
    assert experiment.ARMS["probe"] == ["creator.child_scoring=probe"]
    assert "probe" not in experiment.parse_args([]).arm_list
    assert experiment.parse_args(["--arms", "eva,probe"]).arm_list == ["eva", "probe"]


def test_runs_that_spend_their_rollout_budget_are_complete_and_report_the_steps_they_took(tmp_path):
    experiment = load_experiment()
    runs, out = tmp_path / "runs", tmp_path / "out"
    budget = 1000
    # 15 x 64 + 40 = 1000: spent at step 15 of at most 30. The static run spent 16 x 64 = 1024 at step 16.
    probe = fake_run(runs, "probe", 0, 30, start=0.3, final=0.5, probe=40, budget=budget, steps_done=15)
    static = fake_run(runs, "static", 0, 30, start=0.3, final=0.4, probe=0, budget=budget, steps_done=16)
    short = fake_run(runs, "eva", 0, 30, start=0.3, final=0.6, probe=0, budget=budget, steps_done=10)  # 640: not spent
    overrides = [f"run.total_rollouts={budget}"]
    for rec in (probe, static, short):
        rec["overrides"] = overrides
        experiment.save_run(runs, experiment.run_key(rec["arm"], 0, 30, overrides), rec)
    argv = ["--arms", "probe,static,eva", "--seeds", "1", "--steps", "30", "--rollouts", str(budget), "--out",
            str(out), "--runs-dir", str(runs), "--report-only"]
    experiment.main(argv)
    report = json.loads((out / "experiment.json").read_text())
    got = {r["arm"]: (r["steps"], r["rollouts"]) for r in report["runs"]}
    assert got == {"probe": (15, 1000), "static": (16, 1024)}  # eva ended short of both its steps and its budget
    text = (out / "experiment.md").read_text()
    assert "ends once it has generated 1,000 rollouts" in text
    assert "| 15 | 1,000 |" in text and "| 16 | 1,024 |" in text
