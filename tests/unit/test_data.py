"""Seed-set loading: every format, and every kind of bad row counted instead of crashing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eva_ray.data import DataError, load_seed_prompts, split_seed_set

GOOD = [
    {"prompt": "Explain photosynthesis."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]},
    {"prompt": "Write a haiku about rain."},
]
BAD = [
    {"question": "wrong field"},                       # missing_field
    {"prompt": "   "},                                 # empty
    {"prompt": 42},                                    # not_a_string
    {"prompt": "x" * 101},                             # too_long (limit 100 below)
    {"prompt": [{"role": "robot", "content": "hi"}]},  # bad_messages
    {"prompt": "explain   PHOTOSYNTHESIS."},           # duplicate of row 0 after normalising
    {"prompt": None},                                  # missing_field
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


def test_jsonl_keeps_good_rows_and_counts_each_bad_reason(tmp_path):
    path = tmp_path / "seed.jsonl"
    write_jsonl(path, GOOD + BAD, extra_lines=["{not json", ""])
    records, report = load_seed_prompts(path, max_prompt_chars=100)
    assert [r.prompt_text for r in records] == ["Explain photosynthesis.", "What is 2+2?", "Write a haiku about rain."]
    assert records[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert all(r.source == "seed" and r.generation == 0 for r in records)
    assert report.rows_read == len(GOOD) + len(BAD) + 1
    assert report.kept == 3
    assert dict(report.rejected) == {"missing_field": 2, "empty": 1, "not_a_string": 1, "too_long": 1,
                                     "bad_messages": 1, "duplicate": 1, "bad_json": 1}
    assert report.examples["missing_field"] == [3, 9]
    assert "rejected 8" in report.summary()


def test_parquet_and_datasets_folder_give_the_same_records(tmp_path):
    rows = [{"prompt": "a b c", "uid": "x1"}, {"prompt": "d e f", "uid": "x2"}, {"prompt": "", "uid": "x3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "seed.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "seed_ds"))
    for path in (tmp_path / "seed.parquet", tmp_path / "seed_ds"):
        records, report = load_seed_prompts(path, id_field="uid")
        assert [(r.id, r.text) for r in records] == [("seed-x1", "a b c"), ("seed-x2", "d e f")]
        assert dict(report.rejected) == {"empty": 1}


def test_duplicate_ids_and_bad_ids_are_rejected(tmp_path):
    path = tmp_path / "seed.jsonl"
    write_jsonl(path, [{"prompt": "one", "id": 1}, {"prompt": "two", "id": 1}, {"prompt": "three", "id": ""}])
    records, report = load_seed_prompts(path, id_field="id")
    assert [r.id for r in records] == ["seed-1"]
    assert dict(report.rejected) == {"duplicate": 1, "bad_id": 1}


def test_unusable_inputs_raise_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_seed_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "seed.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_seed_prompts(tmp_path / "seed.csv")
    path = tmp_path / "empty.jsonl"
    write_jsonl(path, [{"text": "wrong field"}])
    with pytest.raises(DataError, match="no usable prompt.*prompt_field='prompt'"):
        load_seed_prompts(path)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_seed_prompts(tmp_path / "broken.parquet")


def test_split_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "seed.jsonl"
    write_jsonl(path, [{"prompt": f"prompt {i}"} for i in range(20)])
    records, _ = load_seed_prompts(path)
    train, held = split_seed_set(records, eval_size=5, shuffle=True, seed=7)
    again_train, again_held = split_seed_set(records, eval_size=5, shuffle=True, seed=7)
    assert [r.id for r in train] == [r.id for r in again_train] and [r.id for r in held] == [r.id for r in again_held]
    assert len(held) == 5 and len(train) == 15 and not {r.id for r in train} & {r.id for r in held}
    assert [r.id for r in train] != [r.id for r in records[5:]]  # shuffled
    capped, _ = split_seed_set(records, eval_size=0, shuffle=False, seed=0, max_prompts=4)
    assert [r.id for r in capped] == [r.id for r in records[:4]]
    with pytest.raises(DataError, match="leaves no training prompt"):
        split_seed_set(records, eval_size=20, shuffle=False, seed=0)
