"""The whole online loop without Ray: the same driver, actors as plain objects."""

import pytest

from eva_ray.config import load_config
from launch.driver import run


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "oaif"])
def test_inline_run_walks_all_phases(algorithm, tmp_path, tiny_cache, monkeypatch, check_run):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"solver.algorithm={algorithm}"])
    summary = run(cfg, inline=True, echo=lambda line: None)
    check_run(summary.run_dir, steps=cfg.run.total_steps)


@pytest.mark.slow
def test_a_starved_run_stops_with_a_clear_error_and_keeps_its_outputs(tmp_path, tiny_cache, monkeypatch):
    import json

    from actors.creator import CreatorStarved

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Every evolve call times out, so the buffer never fills; once D (40 prompts, 4 a step) is used up after 10
    # steps, bootstrap has nothing to train on.
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "evolve.timeout_s=0.001",
                                            "evolve.max_retries=0", "creator.bootstrap_wait_s=1"])
    with pytest.raises(CreatorStarved, match="D is used up and the buffer is empty"):
        run(cfg, inline=True, echo=lambda line: None)
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"].startswith("CreatorStarved") and summary["steps_done"] == 10
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "creator/evolved_prompts" not in m]  # the tables logged on the way
    assert [m["train/global_step"] for m in lines] == list(range(1, 11))  # nothing logged was lost
    assert sum(v for k, v in lines[-1].items() if k.startswith("creator/evolve_failed/")) > 0
    assert (run_dir / "buffer.json").is_file() and (run_dir / "policy" / "config.json").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


class _DeadActor:
    """What the driver holds for an actor whose process died: every call fails, as a Ray handle's would."""

    def __init__(self, name: str) -> None:
        self.name = name

    def call(self, method, *args, **kwargs):
        import concurrent.futures

        future = concurrent.futures.Future()
        future.set_exception(RuntimeError("The actor died unexpectedly before finishing this task.\n(traceback)"))
        return future


class _Learner:
    def save(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")

    def distance_from_reference(self):
        return 0.5


def test_finish_runs_every_step_when_an_actor_is_dead(tmp_path):
    from launch.cluster import System
    from launch.driver import RunSummary, summary_lines
    from launch.handles import InlineActor

    system = System(creator=_DeadActor("creator"), rollout=None, reward=_DeadActor("reward"),
                    learner=InlineActor(_Learner(), "learner"), pad_token_id=0)
    final = system.finish(tmp_path)
    assert (tmp_path / "policy" / "config.json").is_file()  # the dead creator did not cost the policy
    assert final["weight_change"] == 0.5
    assert [e.split(":")[0] for e in final["finish_errors"]] == [
        "creator.drain", "creator.snapshot", "creator.stats", "creator.buffer_records", "creator.provider_stats"]
    assert all("\n" not in e and "actor died" in e for e in final["finish_errors"])
    # A dead learner: the creator's steps still run, and the end-of-run report still prints.
    system = System(creator=_DeadActor("creator"), rollout=None, reward=_DeadActor("reward"),
                    learner=_DeadActor("learner"), pad_token_id=0)
    final = system.finish(tmp_path / "second")
    assert "weight_change" not in final and len(final["finish_errors"]) == 7
    assert summary_lines(RunSummary(run_dir=str(tmp_path), final=final))


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["off", "on"])
def test_sigterm_stops_a_run_like_ctrl_c_and_exits_143(tmp_path, tiny_cache, overlap):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = dict(os.environ, EVA_RAY_CACHE=str(tiny_cache), WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", "--config", "configs/tiny.yaml", "--inline",
                             f"run.output_dir={tmp_path}", "run.total_steps=500", f"run.overlap={overlap}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = list(tmp_path.glob("*/metrics.jsonl"))
            # Two step lines (a line with train/ metrics), not any two lines: the evolved-prompts table and the
            # step-0 evaluation also go to metrics.jsonl.
            if metrics and metrics[0].read_text().count('"train/updates"') >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "terminated (SIGTERM)" in out and "interrupted after" in out
    run_dir = Path(metrics[0]).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    # >= 1, not 2: the signal may land after a step's metrics line is written and before the step is counted.
    assert summary["interrupted"] is True and summary["error"] is None and 1 <= summary["steps_done"] < 500
    assert (run_dir / "policy" / "config.json").is_file() and (run_dir / "buffer.json").is_file()
    assert (run_dir / "lineage.jsonl").stat().st_size > 0
    # The step under way finished (run.sigterm_grace_s), so the run stopped with a checkpoint of its last step.
    assert "stopped at the end of the step" in out
    assert (run_dir / "checkpoints" / f"step-{summary['steps_done']:08d}" / "driver.json").is_file()
    # With overlap the batch prepared ahead when the signal came was trained before the stop: every step the
    # creator handed out was trained, and none is left out of the checkpoint.
    trained = {json.loads(line)["step"] for line in (run_dir / "lineage.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "trained"}
    assert trained == set(range(summary["steps_done"]))
