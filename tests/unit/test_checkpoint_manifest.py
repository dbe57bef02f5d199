"""A checkpoint's manifest and what ``--resume`` does with a damaged checkpoint, on real files (no actors): every kind
of file damaged every way is found and named; the newest intact checkpoint is taken; the storage stop line."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

from eva_ray.atomic import read_jsonl
from eva_ray.config import load_config
from launch.checkpoint import (CHECKPOINTS, MANIFEST, ResumeError, checkpoints, choose, damage, split_resume_path,
                               write_manifest)
from launch.storage import checkpoint_line, space_warning, stop_line, writing

REPO = Path(__file__).resolve().parents[2]
FILES = ["driver.json", "creator.json", "learner/learner.json", "learner/deepspeed/mp_rank_00_model_states.pt",
         MANIFEST]


def make_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / CHECKPOINTS / f"step-{step:08d}"
    (folder / "learner" / "deepspeed").mkdir(parents=True)
    (folder / "driver.json").write_text(json.dumps({"step": step}))
    (folder / "creator.json").write_text(json.dumps({"buffer": list(range(50))}))
    (folder / "learner" / "learner.json").write_text(json.dumps({"version": step}))
    (folder / "learner" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    write_manifest(folder, step)
    return folder


def spoil(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    else:  # wrong JSON of the same length: only the checksum can tell
        size = path.stat().st_size
        path.write_bytes((b'{"wrong": 1}' + b" " * size)[:size])


@pytest.mark.parametrize("how", ["truncated", "emptied", "wrong JSON"])
@pytest.mark.parametrize("name", FILES)
def test_each_damaged_file_is_named_and_the_previous_intact_checkpoint_is_taken(tmp_path, name, how):
    older, newer = make_checkpoint(tmp_path, 4), make_checkpoint(tmp_path, 8)
    assert damage(older) is None and damage(newer) is None
    spoil(newer / name, how)
    problem = damage(newer)
    assert problem is not None and name in problem, problem
    path, notes = choose(tmp_path)
    assert path == older
    assert notes[0].startswith(f"eva-ray: checkpoint step-00000008 is damaged ({name}")
    assert notes[-1].endswith("step 4: 4 steps earlier than the newest one")
    # The damaged one is set aside, so the resumed run writes its step again and never rotates onto it.
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004"]
    assert (tmp_path / CHECKPOINTS / "damaged-step-00000008").is_dir()


def test_with_no_intact_checkpoint_resume_stops_with_one_line_naming_each_and_moves_nothing(tmp_path):
    for step in (4, 8):
        spoil(make_checkpoint(tmp_path, step) / "creator.json", "truncated")
    with pytest.raises(ResumeError) as stop:
        choose(tmp_path)
    line = str(stop.value)
    assert "\n" not in line and "step-00000008: creator.json has" in line and "step-00000004: creator.json" in line
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000008"]


def test_a_chosen_checkpoint_is_resumed_and_the_newer_ones_set_aside(tmp_path):
    first, _, third = (make_checkpoint(tmp_path, s) for s in (4, 8, 12))
    spoil(third / "driver.json", "emptied")
    assert split_resume_path(first) == (tmp_path, first)
    assert split_resume_path(tmp_path) == (tmp_path, None)
    path, notes = choose(tmp_path, first)
    assert path == first and len(notes) == 2
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == [
        "damaged-step-00000012", "step-00000004", "superseded-step-00000008"]
    spoil(first / "learner/learner.json", "wrong JSON")
    with pytest.raises(ResumeError, match="step-00000004 is damaged: learner/learner.json does not match"):
        choose(tmp_path, first)


def test_a_checkpoint_written_before_manifests_is_checked_for_readable_json(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    (folder / MANIFEST).unlink()
    assert damage(folder) is None
    spoil(folder / "creator.json", "truncated")
    assert "creator.json is unreadable" in damage(folder)


def test_a_temp_folder_a_failed_write_left_is_removed_when_resuming(tmp_path):
    make_checkpoint(tmp_path, 4)
    (tmp_path / CHECKPOINTS / ".tmp-step-00000008" / "learner").mkdir(parents=True)
    choose(tmp_path)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["step-00000004"]


def test_the_stop_line_says_what_where_free_space_last_checkpoint_and_resume(tmp_path):
    try:
        with writing("writing the checkpoint of step 30", tmp_path / CHECKPOINTS):
            try:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10 vs 4")
            except RuntimeError as inner:
                # As Ray wraps it: the actor's whole traceback, the writer's message included, in the outer one.
                raise RuntimeError("ray::Learner.save_checkpoint() (pid=1)\n  File ...\n" + str(inner)) from inner
    except RuntimeError as exc:
        line = stop_line(exc, tmp_path, tmp_path / "checkpoints/step-00000020", "eva-ray run --resume R")
    assert line.startswith(f"writing the checkpoint of step 30 failed at {tmp_path / CHECKPOINTS}: RuntimeError: "
                           "[enforce fail")
    assert re.search(r"; [0-9.]+ [MG]B free there; the last complete checkpoint is ", line), line
    assert line.endswith("step-00000020; once there is space, resume with: eva-ray run --resume R")
    # A full disk anywhere (an actor's own write) is one too; other errors are not.
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "lineage.jsonl"))
    assert "a write failed at " in stop_line(full, tmp_path, None, "")
    assert "no checkpoint was written yet" in stop_line(full, tmp_path, None, "")
    assert stop_line(FileNotFoundError(errno.ENOENT, "no model"), tmp_path, None, "") is None
    assert stop_line(TimeoutError(errno.ETIMEDOUT, "hung"), tmp_path, None, "") is None


def test_the_checkpoint_size_is_estimated_and_a_small_disk_warned_about(tmp_path):
    cfg = load_config(REPO / "configs/chain_sum.yaml", ["learner.checkpoint_every=10"])
    # The default world's DeepSpeed checkpoint measured 12,805,295 bytes (ZeRO-0, float32).
    assert checkpoint_line(cfg).startswith("checkpoint: ~14.0 MB each (learner 12.8 MB at ZeRO-0 in float32")
    assert space_warning(cfg, tmp_path, 1_062_912, 1000) is None  # this machine's disk holds three
    huge = load_config(REPO / "configs/chain_sum.yaml", ["learner.checkpoint_every=10", "learner.keep_checkpoints=5"])
    line = space_warning(huge, tmp_path, 10**12, 1000)
    assert line.startswith(f"eva-ray: warning: {tmp_path} has ") and "keeps 5 while writing the next" in line


def test_an_offline_run_counts_its_newest_checkpoint_and_every_iterations_policy(tmp_path):
    cfg = load_config(REPO / "configs/cipher-offline.yaml", ["offline.iterations=4"])
    params = 137_984  # the shipped cipher solver
    line = checkpoint_line(cfg)
    learner, policy = 12 * params, 4 * params  # ZeRO-0 float32: weights + AdamW moments; the policy's weights
    assert "an offline run keeps the newest learner checkpoint" in line and "4 iterations" in line
    assert line.endswith(f"~{(2 * learner + 4 * policy) / 1e6:.1f} MB")
    assert space_warning(cfg, tmp_path, params, 6000) is None  # checkpoint_every is no condition offline
    warning = space_warning(cfg, tmp_path, 10**12, 6000)
    assert warning.startswith(f"eva-ray: warning: {tmp_path} has ") and "each iteration's policy" in warning


def test_metrics_on_a_full_disk_stop_with_the_file_named_and_keep_every_complete_line(tmp_path):
    from launch.metrics import MetricsLogger
    from tests.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 1) as disk:
        logger = MetricsLogger(disk, project="p", run_name="r", config={}, mode_setting="disabled")
        fill(disk / "filler", 0.9)
        with pytest.raises(OSError) as full:
            for step in range(1, 100_000):
                logger.log(step, {"train": {"loss": 0.5, "note": "x" * 200}})
        line = stop_line(full.value, disk, None, "")
        assert line.startswith(f"appending to metrics.jsonl failed at {disk / 'metrics.jsonl'}: [Errno 28] ")
        try:
            logger.close()
        except OSError:
            pass  # the buffered rest of the torn line cannot be written either
        rows = read_jsonl(disk / "metrics.jsonl")
        assert rows and [r["train/global_step"] for r in rows] == list(range(1, len(rows) + 1))
        (disk / "filler").unlink()
        resumed = MetricsLogger(disk, project="p", run_name="r", config={}, mode_setting="disabled",
                                resume_step=len(rows))
        assert resumed.torn_lines == rows.skipped
        resumed.close()
        assert read_jsonl(disk / "metrics.jsonl").skipped == 0
