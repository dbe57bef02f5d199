"""The chain_sum world: reasoning-gym tasks reduced to bare expressions, held-out split, sets and reward."""

import math
import re
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

from eva_ray.data import load_seed_prompts  # noqa: E402
from eva_ray.records import PromptRecord  # noqa: E402
from eva_ray.worlds import WORLDS, get_world, is_world_model, resolve_world_model  # noqa: E402
from eva_ray.worlds import chain_sum as w  # noqa: E402

EXPR = re.compile(r"^\d+([+-]\d+)+=$")


def test_make_task_is_reasoning_gyms_item_reduced_to_the_bare_expression():
    from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset

    for d in (1, 3, 5):
        task = w.make_task(d, 2, seed=1234)
        item = ChainSumDataset(ChainSumConfig(min_terms=2, max_terms=2, min_digits=d, max_digits=d, seed=1234,
                                              size=1))[0]
        assert task.text == item["metadata"]["expression"].replace(" ", "") + "="
        assert task.answer == item["answer"] and int(task.answer) == w.evaluate_expression(task.text)
        assert EXPR.match(task.text)
        operands, _ = w.parse_expression(task.text)
        assert all(len(str(v)) == d for v in operands) if d > 1 else all(0 <= v <= 9 for v in operands)
        assert task.meta() == {"world": "chain_sum", "answer": task.answer, "difficulty": d, "num_terms": 2,
                               "rg_seed": 1234}
    assert w.make_task(3, 2, seed=7) == w.make_task(3, 2, seed=7)


def test_num_terms_knob():
    task = w.make_task(2, 4, seed=3)
    operands, ops = w.parse_expression(task.text)
    assert len(operands) == 4 and len(ops) == 3
    assert w.infer_meta(task.text) | {"rg_seed": 3} == task.meta()
    with pytest.raises(ValueError):
        w.make_task(0, 2, seed=0)
    with pytest.raises(ValueError):
        w.make_task(2, 1, seed=0)


def test_score_answer_of_the_true_answer_is_one_and_of_junk_zero():
    rng = np.random.default_rng(0)
    for d in w.LEVELS:
        task = w.sample_task(d, 2, rng)
        record = task.record("x")
        assert w.reward(record, task.answer) == 1.0
        assert w.reward(record, f"  {task.answer}\n") == 1.0
        assert w.reward(record, "junk") == 0.0
        assert w.reward(record, "") == 0.0
        assert w.reward(record, str(int(task.answer) + 1)) < 1.0


@pytest.mark.parametrize("response", [None, 42, b"12", "", " ", "nan", "sNaN", "inf", "1e999999999", "\x00\ud800",
                                      "x" * 100_000, "9" * 5000, "-", "+", "--3", "1,2,3", "<|end|>"])
def test_reward_never_raises_on_junk_and_stays_in_range(response):
    record = w.make_task(2, 2, seed=5).record("x")
    value = w.reward(record, response)
    assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_reward_partial_credit_is_reasoning_gyms():
    record = PromptRecord(id="x", text="57-87=", meta={"answer": "-30"})
    assert w.reward(record, "-300") == pytest.approx(0.75)  # the oracle is a substring: len(oracle)/len(answer)
    assert w.reward(record, "-30.0") == 1.0 and w.reward(record, "30") == 0.0


def test_reward_without_meta_recomputes_the_answer_and_rejects_non_tasks():
    bare = PromptRecord(id="x", text="57-87=")
    assert w.reward(bare, "-30") == 1.0
    assert w.task_params(bare) == (2, 2)
    with pytest.raises(ValueError):
        w.reward(PromptRecord(id="y", text="Write a poem."), "-30")


def test_seed_set_is_deterministic_mixed_distinct_and_from_the_training_partition():
    mix = {1: 0.25, 2: 0.25, 3: 0.2, 4: 0.15, 5: 0.15}
    a = w.seed_set(300, mix, seed=3)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in w.seed_set(300, mix, seed=3)]
    assert [r.text for r in a] != [r.text for r in w.seed_set(300, mix, seed=4)]
    assert len(a) == 300 and len({r.text for r in a}) == 300
    assert Counter(r.meta["difficulty"] for r in a) == {1: 75, 2: 75, 3: 60, 4: 45, 5: 45}
    assert [r.id for r in a] == [f"seed-{i}" for i in range(300)]
    assert not any(w.is_held_out(r.text) for r in a)
    assert all(w.reward(r, r.meta["answer"]) == 1.0 for r in a)
    levels = [r.meta["difficulty"] for r in a[:20]]
    assert levels != sorted(levels)  # shuffled, not grouped by level


def test_seed_set_refuses_more_level_1_tasks_than_exist():
    with pytest.raises(ValueError, match="level 1"):
        w.seed_set(400, {1: 1.0}, seed=0)  # only ~160 training expressions have 2 one-digit terms


def test_eval_set_is_held_out_and_disjoint_from_every_seed_set():
    ev = w.eval_set(60, seed=0)
    assert [r.to_dict() for r in ev] == [r.to_dict() for r in w.eval_set(60, seed=0)]
    counts = Counter(r.meta["difficulty"] for r in ev)
    assert counts[2] == counts[3] == counts[4] == counts[5] == 60
    assert 25 <= counts[1] <= 55  # d=1 has 200 expressions, ~20% of them held out
    assert len({r.text for r in ev}) == len(ev) and all(w.is_held_out(r.text) for r in ev)
    texts = {r.text for r in ev}
    for seed in (0, 1, 2):
        assert not texts & {r.text for r in w.seed_set(150, seed=seed)}
    rng = np.random.default_rng(0)
    assert not texts & {w.sample_task(1, 2, rng).text for _ in range(300)}  # SFT data comes from the same side


def test_held_out_partition_is_stable_and_about_a_fifth():
    assert w.is_held_out("57-87=") == w.is_held_out(" 57 - 87 = ")
    rng = np.random.default_rng(1)
    share = np.mean([w.is_held_out(w.make_task(3, 2, seed=int(s)).text) for s in rng.integers(0, 2**40, 2000)])
    assert 0.17 < share < 0.23


def test_jsonl_round_trip_and_the_loader_reads_the_prompts(tmp_path):
    records = w.seed_set(20, seed=0)
    path = w.write_jsonl(records, tmp_path / "seed.jsonl")
    assert [r.to_dict() for r in w.read_jsonl(path)] == [r.to_dict() for r in records]
    loaded, report = load_seed_prompts(path)
    assert report.kept == 20 and [r.text for r in loaded] == [r.text for r in records]
    assert all(w.reward(r, rec.meta["answer"]) == 1.0 for r, rec in zip(loaded, records))  # meta-less still scores


def test_cli_writes_seed_and_eval_files(tmp_path):
    w.main(["--out-dir", str(tmp_path), "--n-seed", "50", "--n-eval-per-level", "10", "--seed", "2"])
    seeds, evals = w.read_jsonl(tmp_path / "seed.jsonl"), w.read_jsonl(tmp_path / "eval.jsonl")
    assert len(seeds) == 50 and not {r.text for r in seeds} & {r.text for r in evals}


def test_world_registry_and_model_scheme():
    assert {"chain_sum", "cipher"} <= set(WORLDS) and get_world("chain_sum") is w.ChainSumWorld
    with pytest.raises(ValueError):
        get_world("nope")
    assert is_world_model("world:chain_sum_solver") and not is_world_model("tiny:policy")
    with pytest.raises(ValueError):
        resolve_world_model("world:nope")
