"""Storage faults in real runs of the chain_sum world (inline, in a subprocess as a user runs it):

* a run directory on a small real filesystem that fills up mid-run stops with one line, keeps its complete
  checkpoints, summary and logs readable, leaves no temp folder, and resumes once space is freed to train exactly
  what an uninterrupted run trains;
* a damaged newest checkpoint (truncated, emptied, wrong JSON) is named, set aside, and the run resumes from the
  previous intact one, training exactly what the uninterrupted run trained from there; a chosen checkpoint can be
  resumed too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eva_ray.atomic import read_jsonl
from eva_ray.lineage import read_lineage
from launch.checkpoint import CHECKPOINTS, checkpoints, damage
from tests.disk import fill, small_disk

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL = ["world.seed_size=40", "world.eval_per_level=2", "logging.eval_every=5", "creator.capacity=24",
         "creator.snapshot_every=3", "logging.progress=false", "creator.bootstrap_wait_s=5"]


def run_cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_SERVICE", None)  # a child must not share this pytest process's wandb service
    out = subprocess.run([sys.executable, "-m", "launch", "run", "--inline", *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return out.returncode, out.stdout


def trained(run_dir: Path) -> list[tuple[int, str]]:
    return [(e["step"], e["id"]) for e in read_lineage(run_dir / "lineage.jsonl") if e["event"] == "trained"]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_summary_printed_last(output: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("  outputs: "), lines[-3:]
    assert "Run history" not in output and "Run summary" not in output  # wandb's own end block is off


def test_a_disk_that_fills_mid_run_stops_with_one_line_and_the_run_resumes_once_space_is_freed(tmp_path):
    # The run fails writing its last checkpoint (step 15): it trained steps 10-14 uninterrupted after the checkpoint
    # it resumes from, so the resumed run must train exactly those again.
    overrides = ["run.total_steps=15", "learner.checkpoint_every=5", *SMALL]
    with small_disk(tmp_path / "disk", 48) as disk:
        # 13 MB a checkpoint: two fit, the third (step 15) does not, until the filler goes.
        filler = fill(disk / "filler", 13)
        rc, out = run_cli("--config", "configs/chain_sum.yaml", f"run.output_dir={disk}", *overrides)
        (run_dir,) = disk.glob("chain-sum-*")
        assert rc == 1, out[-3000:]
        assert "eva-ray: warning: " in out and "keeps 2 while writing the next" in out  # said at the start
        stops = [line for line in out.splitlines() if "run stopped" in line]
        assert len(stops) == 1 and out.strip().splitlines()[-1] == stops[0], out[-3000:]
        stop = stops[0]
        assert stop.startswith("eva-ray: run stopped: StorageError: writing the checkpoint of step 15 failed at "
                               f"{run_dir / CHECKPOINTS}: "), stop
        assert " free there; the last complete checkpoint is " f"{run_dir / CHECKPOINTS / 'step-00000010'}" in stop
        assert stop.endswith(f"once there is space, resume with: python -m launch run --resume {run_dir}")
        assert "Traceback" not in out and "could not" not in out

        # What is on disk: the two complete checkpoints, verified; no temp folder; readable summary and logs.
        assert [p.name for p in checkpoints(run_dir)] == ["step-00000005", "step-00000010"]
        assert all(damage(p) is None for p in checkpoints(run_dir))
        assert not [p for p in run_dir.rglob(".tmp-*")]
        summary = summary_of(run_dir)
        assert summary["steps_done"] == 15 and summary["error"].startswith("StorageError: writing the checkpoint")
        assert summary["checkpoint"]["step"] == 10
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        assert metrics.skipped == 0 and max(r["train/global_step"] for r in metrics) == 15
        json.loads((run_dir / "buffer.json").read_text())
        uninterrupted, moved = trained(run_dir), summary["final"]["weight_change"]
        assert {s for s, _ in uninterrupted} == set(range(15))

        filler.unlink()  # the user frees space
        rc, out = run_cli("--resume", str(run_dir))
        assert rc == 0, out[-3000:]
        assert f"resuming {run_dir} from its checkpoint at step 10" in out
        assert_summary_printed_last(out)
        summary = summary_of(run_dir)
        assert summary["steps_done"] == 15 and summary["error"] is None and summary["resumed_from"] == [10]
        assert trained(run_dir) == uninterrupted  # the same prompts at every step, in the same order
        assert summary["final"]["weight_change"] == moved  # and the policy ends where it did
        assert [p.name for p in checkpoints(run_dir)] == ["step-00000010", "step-00000015"]


STEPS, EVERY = 10, 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 10-step run with checkpoints kept at steps 8 and 10 (the run's end)."""
    root = tmp_path_factory.mktemp("finished")
    rc, out = run_cli("--config", "configs/chain_sum.yaml", f"run.output_dir={root}", f"run.total_steps={STEPS}",
                      f"learner.checkpoint_every={EVERY}", "logging.wandb_mode=disabled", *SMALL)
    assert rc == 0, out[-3000:]
    (run_dir,) = root.glob("chain-sum-*")
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000008", "step-00000010"]
    return run_dir


def spoil(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        path.write_text('{"not": "this checkpoint"}')


@pytest.mark.parametrize("name,how", [("learner/deepspeed/mp_rank_00_model_states.pt", "truncated"),
                                      ("learner/learner.json", "emptied"),
                                      ("creator.json", "wrong JSON")])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_intact_one(
        finished_run, tmp_path, name, how):
    run_dir = tmp_path / finished_run.name
    shutil.copytree(finished_run, run_dir)
    newest = run_dir / CHECKPOINTS / "step-00000010"
    assert (newest / name).is_file()
    spoil(newest / name, how)
    rc, out = run_cli("--resume", str(run_dir))
    assert rc == 0, out[-3000:]
    lines = out.splitlines()
    assert any(line.startswith(f"eva-ray: checkpoint step-00000010 is damaged ({name} ") for line in lines), out
    assert "eva-ray: resuming from the newest intact checkpoint, step 8: 2 steps earlier than the newest one" in lines
    assert f"eva-ray: resuming {run_dir} from its checkpoint at step 8" in lines
    assert "Traceback" not in out
    summary = summary_of(run_dir)
    assert summary["steps_done"] == STEPS and summary["resumed_from"] == [8]
    assert trained(run_dir) == trained(finished_run)  # steps 8 and 9 trained again, exactly as the first time
    assert summary["phases"] == summary_of(finished_run)["phases"]
    assert summary["final"]["weight_change"] == summary_of(finished_run)["final"]["weight_change"]
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == [
        "damaged-step-00000010", "step-00000008", "step-00000010"]
    assert damage(run_dir / CHECKPOINTS / "step-00000010") is None  # written again, intact


def test_a_chosen_checkpoint_is_resumed_and_no_intact_one_is_one_line(finished_run, tmp_path):
    run_dir = tmp_path / finished_run.name
    shutil.copytree(finished_run, run_dir)
    rc, out = run_cli("--resume", str(run_dir / CHECKPOINTS / "step-00000008"))
    assert rc == 0, out[-3000:]
    assert "eva-ray: checkpoint step-00000010 is newer than the one resumed from; set aside as " \
           "superseded-step-00000010" in out
    assert trained(run_dir) == trained(finished_run)
    assert summary_of(run_dir)["resumed_from"] == [8]

    for ckpt in checkpoints(run_dir):
        spoil(ckpt / "creator.json", "wrong JSON")
    rc, out = run_cli("--resume", str(run_dir))
    assert rc == 2
    errors = [line for line in out.splitlines() if line.startswith("eva-ray:")]
    assert len(errors) == 1 and errors[0].startswith(f"eva-ray: ResumeError: no intact checkpoint in {run_dir}"), out
    assert "step-00000010: creator.json has " in errors[0] and "Traceback" not in out
