"""Actor deaths on a real local Ray cluster, injected with kill -9 on the actor's process (no mocks of the fault).

A rollout worker killed mid-run is restarted by Ray, the weight channel is rebuilt around it, and the run completes
with the restart counted. The learner killed mid-run stops the run with one line naming it and the resume command,
after writing its outputs; ``--resume`` then finishes the run.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from eva_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, *extra: str):
    return load_config(str(REPO / "configs/chain_sum.yaml"), [
        f"run.output_dir={tmp_path}", "run.total_steps=8", "world.seed_size=40", "world.eval_per_level=0",
        "creator.capacity=24", "creator.snapshot_every=2", "learner.checkpoint_every=2", "logging.progress=false",
        "logging.wandb_mode=disabled", "solver.skip_zero_advantage=false", "resources.rollout.num_cpus=0.25",
        "resources.learner.num_cpus=0.25", *extra])


def kill(handle) -> int:
    import ray

    pid = ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_before_step(monkeypatch, victims: dict):
    """Kill the process of ``victims[k](system)`` with SIGKILL just before the driver starts step ``k``."""
    import launch.driver as driver

    real = driver.one_step
    killed = []

    def one_step(cfg, system, k, summary, restarts=None, **kwargs):
        if k in victims and k not in [step for step, _ in killed]:
            killed.append((k, kill(victims[k](system).handle)))
        return real(cfg, system, k, summary, restarts, **kwargs)

    monkeypatch.setattr(driver, "one_step", one_step)
    return killed


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/skipped" in r]


def test_a_rollout_worker_and_the_reward_actor_killed_mid_run_are_restarted_and_the_run_completes(tmp_path,
                                                                                                 monkeypatch):
    from launch.driver import run

    killed = kill_before_step(monkeypatch, {3: lambda system: system.rollout.workers[1],
                                            5: lambda system: system.reward})
    summary = run(config(tmp_path, "resources.rollout.num_workers=2"), echo=print)
    assert [step for step, _ in killed] == [3, 5]
    assert summary.steps_done == 8 and summary.error is None
    assert summary.restarts == {"rollout": 1, "reward": 1}
    run_dir = Path(summary.run_dir)
    rows = metrics(run_dir)
    assert [r["train/global_step"] for r in rows] == list(range(1, 9))
    assert [r["rollout/restarts"] for r in rows] == [0, 0, 0] + [1] * 5  # killed before step index 3
    assert [r["reward/restarts"] for r in rows] == [0] * 5 + [1] * 3
    # After the restart every worker held the learner's policy again: no rollout lagged past the bound.
    assert summary.max_staleness_seen <= 1
    assert json.loads((run_dir / "summary.json").read_text())["restarts"]["rollout"] == 1


def test_a_rollout_worker_killed_while_the_next_batch_is_generated_during_training_is_restarted(tmp_path,
                                                                                                monkeypatch):
    from launch.driver import run

    # No checkpoints: every step prepares the next batch while the learner trains, so the dead worker is met by
    # that generate call, and the recovery resyncs from a learner that is still in its step.
    killed = kill_before_step(monkeypatch, {2: lambda system: system.rollout.workers[1]})
    summary = run(config(tmp_path, "resources.rollout.num_workers=2", "learner.checkpoint_every=0"), echo=print)
    assert [step for step, _ in killed] == [2]
    assert summary.steps_done == 8 and summary.error is None and summary.restarts == {"rollout": 1}
    rows = metrics(Path(summary.run_dir))
    assert [r["rollout/restarts"] for r in rows] == [0, 0] + [1] * 6
    assert rows[2]["timing/prefetch_s"] > 0 and summary.max_staleness_seen <= 1


def test_a_killed_learner_stops_the_run_with_the_resume_line_and_resume_finishes_it(tmp_path, monkeypatch):
    from launch.driver import run
    from launch.recovery import ActorLost

    cfg = config(tmp_path)
    killed = kill_before_step(monkeypatch, {5: lambda system: system.learner})
    with pytest.raises(ActorLost) as info:
        run(cfg, echo=print)
    assert killed
    (run_dir,) = Path(tmp_path).glob("chain-sum-*")
    line = str(info.value)
    assert "\n" not in line and "learner" in line and "the last checkpoint is step 4" in line
    assert line.endswith(f"run --resume {run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 5  # steps 0..4 done; step 5 stopped at the learner
    assert summary["error"] == f"ActorLost: {line}"
    assert (run_dir / "buffer.json").is_file() and (run_dir / "checkpoints" / "step-00000004").is_dir()
    assert [r["train/global_step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]

    monkeypatch.undo()
    resumed = run(load_config(run_dir / "config.yaml"), resume=run_dir, echo=print)
    assert resumed.steps_done == 8 and resumed.error is None and resumed.resumed_from == [4]
    assert [r["train/global_step"] for r in metrics(run_dir)] == list(range(1, 9))
    assert resumed.final["learner_version"] == 8  # skip_zero_advantage off: every step applied one update


def test_a_killed_creator_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from launch.driver import run
    from launch.recovery import ActorLost

    killed = kill_before_step(monkeypatch, {3: lambda system: system.creator})
    with pytest.raises(ActorLost) as info:
        run(config(tmp_path), echo=print)
    assert killed
    (run_dir,) = Path(tmp_path).glob("chain-sum-*")
    line = str(info.value)
    assert line.startswith("the creator actor died") and "the last checkpoint is step 2" in line
    assert line.endswith(f"run --resume {run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["error"] == f"ActorLost: {line}"
    # The learner was alive: its policy is saved; the buffer snapshot of step 2 and the checkpoint stay.
    assert (run_dir / "policy" / "config.json").is_file() and (run_dir / "buffer.json").is_file()
    assert (run_dir / "checkpoints" / "step-00000002" / "driver.json").is_file()
    assert any(p.startswith("creator.") for p in summary["final"]["finish_errors"])
