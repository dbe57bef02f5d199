"""Offline eva's Ray-free parts: the next set, the pairs and win probabilities, the iteration store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eva_ray.offline.next_set import draw_informative, fresh_slice, mix_next_set
from eva_ray.offline.pairs import best_worst_pairs, bradley_terry_matrix, win_probabilities
from eva_ray.offline.store import IterationStore, groups_of, responses_on_disk
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout


def records(n: int, prefix: str = "p") -> list[PromptRecord]:
    return [PromptRecord(id=f"{prefix}{i}", text=f"prompt {prefix}{i}") for i in range(n)]


# ------------------------------------------------------------------------------------------------- the draw


def test_draw_follows_the_scores():
    rng = np.random.default_rng(0)
    recs = records(40)
    scores = [10.0 if i < 4 else 0.1 for i in range(40)]
    hits = np.zeros(40)
    for _ in range(300):
        for r in draw_informative(recs, scores, 0.1, rng).parents:
            hits[int(r.id[1:])] += 1
    assert hits[:4].sum() > 5 * hits[4:].sum()  # weight 100x per prompt, 9x fewer prompts


def test_draw_size_is_the_ceiling_of_the_share_and_never_repeats():
    draw = draw_informative(records(10), [1.0] * 10, 0.25, np.random.default_rng(1))
    assert len(draw.parents) == 3 and len({r.id for r in draw.parents}) == 3


def test_draw_takes_every_positive_prompt_when_too_few_and_fills_uniformly():
    scores = [0.0] * 20
    scores[7] = 0.5
    draw = draw_informative(records(20), scores, 0.25, np.random.default_rng(2))
    assert len(draw.parents) == 5 and "p7" in {r.id for r in draw.parents} and draw.positive == 1
    assert not draw.uniform_fallback


def test_draw_without_any_spread_is_uniform_and_says_so():
    scores = [0.0, float("nan"), -1.0, 0.0]
    draw = draw_informative(records(4), scores, 0.5, np.random.default_rng(3))
    assert draw.uniform_fallback and len(draw.parents) == 2


def test_draw_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 prompts but 2 scores"):
        draw_informative(records(3), [1.0, 2.0], 0.5, np.random.default_rng(0))


# -------------------------------------------------------------------------------------------------- the mix


def test_mix_takes_the_evolved_share_and_the_rest_from_the_current_set():
    mix = mix_next_set(records(50, "c"), records(20, "s"), 20, 0.8, np.random.default_rng(0))
    ids = [r.id for r in mix.prompts]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert sum(i.startswith("c") for i in ids) == 16 and mix.evolved == 16 and mix.kept == 4 and mix.short == 0


def test_mix_fills_a_shortfall_of_children_from_the_current_set():
    mix = mix_next_set(records(3, "c"), records(10, "s"), 10, 0.8, np.random.default_rng(0))
    assert mix.evolved == 3 and mix.kept == 7 and mix.short == 5 and len(mix.prompts) == 10


def test_mix_cycles_a_current_set_smaller_than_the_gap():
    mix = mix_next_set([], records(3, "s"), 7, 0.5, np.random.default_rng(0))
    assert len(mix.prompts) == 7 and {r.id for r in mix.prompts} == {"s0", "s1", "s2"}


def test_fresh_slices_walk_d_once_then_in_a_new_order():
    seed = records(10)
    first, passes = fresh_slice(seed, 1, 4, 0)
    second, _ = fresh_slice(seed, 2, 4, 0)
    third, passes3 = fresh_slice(seed, 3, 4, 0)
    assert [r.id for r in first] == ["p0", "p1", "p2", "p3"] and passes == 1
    assert [r.id for r in second] == ["p4", "p5", "p6", "p7"]
    assert [r.id for r in third[:2]] == ["p8", "p9"] and passes3 == 2
    assert fresh_slice(seed, 3, 4, 0)[0] == third  # deterministic


# ------------------------------------------------------------------------------------------------- the pairs


def test_pairs_are_best_against_worst_and_skip_ties():
    pairs = best_worst_pairs([[0.1, 0.9, 0.5], [1.0, 1.0], [float("nan"), 0.2, -3.0], [0.4]])
    assert [(p.prompt_index, p.chosen, p.rejected) for p in pairs] == [(0, 1, 0), (2, 1, 2)]


def test_bradley_terry_win_probabilities():
    probs = win_probabilities(bradley_terry_matrix([1.0, 0.0]))
    s = 1 / (1 + math.exp(-1))
    assert probs == pytest.approx([(0.5 + s) / 2, (0.5 + 1 - s) / 2])
    equal = win_probabilities(bradley_terry_matrix([0.3, 0.3, 0.3]))
    assert equal == pytest.approx([0.5, 0.5, 0.5])


def test_a_response_without_a_reward_loses_to_every_scored_one():
    probs = win_probabilities(bradley_terry_matrix([0.0, float("nan")]))
    assert probs == pytest.approx([0.75, 0.25])


def test_win_probabilities_reject_a_bad_matrix():
    with pytest.raises(ValueError, match="k x k"):
        win_probabilities(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        win_probabilities(np.array([[0.5, 1.5], [0.2, 0.5]]))


# ------------------------------------------------------------------------------------------------- the store


def rollout(pid: str, i: int) -> Rollout:
    return Rollout(prompt_id=pid, prompt_token_ids=[1, 2, 3], response_token_ids=[4 + i, 9], text=f"answer {i}",
                   finish_reason="stop", policy_version=2)


def test_store_round_trips_prompts_shards_and_pairs(tmp_path):
    store = IterationStore(tmp_path, 2)
    assert not store.path.exists()  # nothing is made until something is written
    recs = records(3)
    recs[1] = PromptRecord(id="e1", text="evolved", source="evolved", parent_id="p0", generation=1,
                           operator="harder", info=0.5, meta={"difficulty": 2})
    store.write_prompts(recs, {"how": "evolved"})
    back = store.prompts()
    assert back == recs and store.manifest()["made"] == {"how": "evolved"}
    groups = [[rollout(r.id, i) for i in range(2)] for r in recs]
    store.write_shard("responses", 1, groups[2:], [[1.0, 0.0]])
    store.write_shard("responses", 0, groups[:2], [[0.5, 0.25], [0.0, 1.0]])
    assert store.done_shards("responses", 3) == [0, 1]
    ids, got, rewards = groups_of(store.read_shards("responses", 2))
    assert ids == [r.id for r in recs] and got == groups and rewards == [[0.5, 0.25], [0.0, 1.0], [1.0, 0.0]]
    assert responses_on_disk(tmp_path) == 6
    with pytest.raises(ValueError, match="unknown shard kind"):
        store.shard_file("pairs", 0)


def test_pairs_file_reads_as_a_hugging_face_preference_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    store = IterationStore(tmp_path, 1)
    row = {"prompt_id": "p0", "prompt": "x", "chosen": "good", "rejected": "bad", "chosen_reward": 1.0,
           "rejected_reward": 0.0, "chosen_target": 1.0, "rejected_target": 0.0, "prompt_token_ids": [1],
           "chosen_token_ids": [2, 3], "rejected_token_ids": [4], "rewritten": False, "original_chosen": None}
    store.write_pairs([row])
    ds = datasets.load_dataset("parquet", data_files=str(store.pairs_file), split="train")
    assert ds.num_rows == 1 and ds[0]["prompt"] == "x" and ds[0]["chosen"] == "good" and ds[0]["rejected"] == "bad"


def test_a_half_written_file_of_a_killed_run_is_swept_away(tmp_path):
    store = IterationStore(tmp_path, 1)
    store.write_prompts(records(1), {})
    stale = store.path / ".tmp-pairs.parquet.abc"
    stale.write_bytes(b"torn")
    IterationStore(tmp_path, 1)
    assert not stale.exists() and store.has_prompts()
