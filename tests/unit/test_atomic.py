"""Atomic writes on a real full filesystem: a failed write leaves the previous complete version and no temp file;
a JSONL reader skips a torn last line and counts it."""

from __future__ import annotations

import errno
import json

import pytest

from eva_ray.atomic import read_jsonl, staged_dir, write_json, write_text
from eva_ray.lineage import LineageLog, read_lineage
from tests.disk import fill, small_disk


def test_a_write_that_fills_the_disk_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    with small_disk(tmp_path / "disk", 2) as disk:
        path = disk / "summary.json"
        write_json(path, {"steps_done": 3})
        fill(disk / "filler", 1.5)
        with pytest.raises(OSError) as failed:
            write_text(path, "x" * 1_000_000)
        assert failed.value.errno == errno.ENOSPC
        assert json.loads(path.read_text()) == {"steps_done": 3}
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "summary.json"]


def test_a_folder_that_fills_the_disk_keeps_the_previous_folder_and_frees_its_space(tmp_path):
    with small_disk(tmp_path / "disk", 3) as disk:
        with staged_dir(disk / "policy") as tmp:
            (tmp / "weights").write_bytes(b"a" * 500_000)
        fill(disk / "filler", 1.5)
        with pytest.raises(OSError):
            with staged_dir(disk / "policy") as tmp:
                (tmp / "config.json").write_text("{}")
                (tmp / "weights").write_bytes(b"b" * 2_000_000)
        assert (disk / "policy" / "weights").read_bytes() == b"a" * 500_000
        assert not (disk / "policy" / "config.json").exists()
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "policy"]
        # The failed folder's space is back: a write of that size fits again once the filler goes.
        (disk / "filler").unlink()
        with staged_dir(disk / "policy") as tmp:
            (tmp / "weights").write_bytes(b"b" * 2_000_000)
        assert (disk / "policy" / "weights").stat().st_size == 2_000_000


def test_a_folder_replaces_the_previous_one_only_when_complete(tmp_path):
    with staged_dir(tmp_path / "policy") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with staged_dir(tmp_path / "policy") as tmp:
            (tmp / "a").write_text("2")
            raise ValueError("the writer failed")
    assert (tmp_path / "policy" / "a").read_text() == "1"
    with staged_dir(tmp_path / "policy") as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_readers_of_append_only_logs_skip_a_torn_last_line_and_count_it(tmp_path):
    log = LineageLog(tmp_path / "lineage.jsonl")
    log.write([{"event": "trained", "step": 0, "id": "a"}, {"event": "trained", "step": 0, "id": "b"}])
    log.close()
    with open(tmp_path / "lineage.jsonl", "a") as fh:
        fh.write('{"event": "trained", "st')  # a full disk cut the last append short
    events = read_lineage(tmp_path / "lineage.jsonl")
    assert [e["id"] for e in events] == ["a", "b"] and events.skipped == 1
    rows = read_jsonl(tmp_path / "lineage.jsonl")
    assert len(rows) == 2 and rows.skipped == 1


def test_torch_save_cut_short_by_a_full_disk_gives_its_space_back_with_the_temp_folder(tmp_path):
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import torch

    with small_disk(tmp_path / "disk", 4) as disk, ThreadPoolExecutor(1) as actor:
        free = shutil.disk_usage(disk).free
        with pytest.raises(RuntimeError, match="unexpected pos|iostream|PytorchStreamWriter"):
            with staged_dir(disk / "checkpoint") as tmp:
                # As the learner writes it when it runs inline: in the actor's thread, its error passed on by a future.
                actor.submit(torch.save, {"w": torch.zeros(2_000_000)}, tmp / "model_states.pt").result()
        # The temp folder is gone and so is its space. (In a whole inline run the failed writer was still open
        # through the error's frames and kept the unlinked file's blocks; test_storage_faults covers that case.)
        assert list(disk.iterdir()) == []
        assert shutil.disk_usage(disk).free >= free - 64 * 1024


def test_a_writer_that_makes_its_own_folder_or_writes_nothing(tmp_path):
    with staged_dir(tmp_path / "policy", create=False) as tmp:
        tmp.mkdir()  # as save_pretrained does
        (tmp / "config.json").write_text("{}")
    with staged_dir(tmp_path / "policy", create=False):
        pass  # a learner rank that holds no weights writes nothing: the policy stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert (tmp_path / "policy" / "config.json").read_text() == "{}"
