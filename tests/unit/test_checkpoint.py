"""The pieces of checkpoint/resume that need no actors: which config keys may change, cutting metrics.jsonl back
to a checkpoint, finding the last complete checkpoint, a hung call reported by name, and Ray's start-up setting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eva_ray.config import load_config, to_dict
from launch.checkpoint import DRIVER_STATE, ResumeError, check_resumable, checkpoints, config_changes, latest
from launch.handles import ActorTimeout, InlineActor, gather
from launch.metrics import keep_until

REPO = Path(__file__).resolve().parents[2]


def tree(*overrides: str) -> dict:
    return to_dict(load_config(REPO / "configs/chain_sum.yaml", list(overrides)))


def test_only_total_steps_timeouts_and_logging_may_change_on_resume():
    saved = tree()
    assert config_changes(saved, tree("run.total_steps=900", "logging.wandb_mode=disabled",
                                      "run.call_timeout_s=60")) == []
    changed = config_changes(saved, tree("learner.lr=0.1", "creator.capacity=70", "run.total_steps=5"))
    assert changed == ["creator.capacity: 200 -> 70", "learner.lr: 1e-05 -> 0.1"]


def test_a_resume_with_a_changed_config_is_one_error_naming_every_key(tmp_path):
    with pytest.raises(ResumeError, match=r"in 2 key\(s\).*creator.capacity: 200 -> 70; learner.lr: 1e-05 -> 0.1"):
        check_resumable(tmp_path, tree(), tree("learner.lr=0.1", "creator.capacity=70"))
    with pytest.raises(ResumeError, match="has no checkpoint"):
        check_resumable(tmp_path, tree(), tree())


def test_the_latest_checkpoint_is_the_last_complete_one(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-00000004", True), ("step-00000012", True), ("step-00000016", False),
                           (".tmp-step-00000020", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / DRIVER_STATE).write_text("{}")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000012"]
    assert latest(tmp_path).name == "step-00000012"


def test_metrics_are_cut_back_to_the_checkpoint_and_a_torn_line_goes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"train/global_step": s, "x": s} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"train/global_st')
    assert keep_until(path, 2) == 3
    assert [json.loads(line)["train/global_step"] for line in path.read_text().splitlines()] == [0, 1, 2]


class Hung:
    async def wait_forever(self) -> None:
        await asyncio.sleep(3600)


def test_a_call_that_never_answers_is_reported_by_name():
    actor = InlineActor(Hung(), "creator")
    try:
        with pytest.raises(ActorTimeout, match=r"creator.wait_forever did not answer within 0s"):
            gather([actor.call("wait_forever")], timeout=0.2)
    finally:
        actor.shutdown()


def test_importing_the_launch_layer_sets_the_loopback_setting_before_ray_is_imported():
    code = ("import os, sys; os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None); import launch.cli; "
            "print(os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'], 'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_a_ray_address_nothing_answers_on_is_one_clear_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # the discard port: nothing listens
    out = subprocess.run([sys.executable, "-m", "launch", "run", "--config", "configs/tiny.yaml",
                          f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("eva-ray:")]
    assert errors == [errors[0]] and "no Ray cluster answers at RAY_ADDRESS=127.0.0.1:9" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_the_stop_line_names_the_hung_call_even_behind_another_error_and_says_how_to_resume(tmp_path):
    from launch.recovery import lost_line

    try:
        try:
            raise ActorTimeout("learner-1.train_step did not answer within 5s (run.call_timeout_s): hung")
        except ActorTimeout as inner:
            raise RuntimeError("learner-1 failed in train_step") from inner
    except RuntimeError as outer:
        line = lost_line(outer, str(tmp_path), 12)
    assert line.startswith("learner-1.train_step did not answer within 5s")
    assert "; the last checkpoint is step 12; resume with: " in line and line.endswith(f"run --resume {tmp_path}")
    assert lost_line(ValueError("a bug"), str(tmp_path), 12) is None


def test_an_offline_stop_line_says_what_is_kept_instead_of_a_step(tmp_path):
    from launch.recovery import lost_line

    line = lost_line(ActorTimeout("learner-0.train_step did not answer within 5s"), str(tmp_path), None,
                     kept="finished shards and the last checkpoint are kept")
    assert line.startswith("learner-0.train_step did not answer")
    assert "; finished shards and the last checkpoint are kept; resume with: " in line and "step" not in line.split(";")[1]
