"""The cipher world: its key, generator, verifier, held-out split, parameters and curriculum moves."""

import asyncio

import numpy as np
import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.evolve.curriculum import AT_MAX_DIFFICULTY, AT_MIN_DIFFICULTY, CurriculumEvolver
from eva_ray.records import PromptRecord
from eva_ray.worlds import WorldParamError, make_world
from eva_ray.worlds.base import is_held_out
from eva_ray.worlds.cipher import derangement, exact_reward


def world(**params):
    return make_world("cipher", params, seed=7)


def test_the_key_is_a_derangement_drawn_from_the_seed():
    for seed in range(50):
        key = derangement(10, seed)
        assert sorted(key) == list(range(10)) and all(k != i for i, k in enumerate(key))
    assert derangement(10, 3) == derangement(10, 3) and derangement(10, 3) != derangement(10, 4)
    assert world().key == derangement(10, 7)  # key_seed unset: the run's seed
    assert world(key_seed=3).key == derangement(10, 3)


def test_a_task_copies_plain_letters_and_encrypts_marked_ones():
    w = world()
    task = w.task("abcdef", {1, 4})
    assert task.text == "aBcdEf" and task.difficulty == 2
    f = {c: w.alphabet[w.key[i]] for i, c in enumerate(w.alphabet)}
    assert task.answer == "a" + f["b"] + "cd" + f["e"] + "f"
    rec = task.record("t")
    assert exact_reward(rec, task.answer) == 1.0 and exact_reward(rec, f" {task.answer}\n") == 1.0
    for junk in ("abcdef", "", None, 7, task.answer + "a", task.answer.upper()):
        assert exact_reward(rec, junk) == 0.0
    with pytest.raises(ValueError):
        exact_reward(PromptRecord(id="x", text="aBcdEf"), task.answer)  # no answer: a wiring error, not a 0
    assert w.answer(PromptRecord(id="x", text="aBcdEf")) == task.answer  # recomputed from the text


@pytest.mark.parametrize("d", [0, 1, 3, 6])
def test_draws_have_the_asked_difficulty_and_read_back(d):
    w = world()
    rng = np.random.default_rng(0)
    for _ in range(50):
        task = w.draw_task({"difficulty": d}, rng)
        rec = task.record("r")
        assert len(task.text) == 6 and sum(c.isupper() for c in task.text) == d
        assert w.knobs(PromptRecord(id="bare", text=task.text)) == {"difficulty": d}
        assert set(task.text.lower()) <= set("abcdefghij")


def test_not_a_task_is_refused_by_parse():
    w = world()
    for text in ("abc", "abcdefg", "abcdeZ", "a-cdef", ""):
        with pytest.raises(ValueError):
            w.knobs(PromptRecord(id="x", text=text))


def test_seed_and_eval_sets_are_disjoint_deterministic_and_mixed():
    w = world()
    seeds = w.seed_set(300, {3: 1, 4: 1, 5: 1, 6: 1}, seed=1)
    again = world().seed_set(300, {3: 1, 4: 1, 5: 1, 6: 1}, seed=1)
    assert [r.text for r in seeds] == [r.text for r in again] and len({r.text for r in seeds}) == 300
    assert sorted({r.meta["difficulty"] for r in seeds}) == [3, 4, 5, 6]
    evals = w.eval_set(100, seed=0)
    assert [sum(r.meta["difficulty"] == d for r in evals) for d in w.levels] == [100] * 6
    assert all(is_held_out(r.text) for r in evals) and not any(is_held_out(r.text) for r in seeds)
    assert not {r.text for r in evals} & {r.text for r in seeds}


def test_bad_params_name_their_path():
    with pytest.raises(WorldParamError, match="world.params.letters"):
        world(letters=1)
    with pytest.raises(WorldParamError, match="world.params.colour"):
        world(colour=3)
    with pytest.raises(ConfigError, match="world.params.length"):
        load_config(None, ["world.name=cipher", "world.params.length=0"])
    with pytest.raises(ConfigError, match="world.level_mix"):
        load_config(None, ["world.name=cipher", "world.level_mix=[1, 1]"])
    cfg = load_config(None, ["world.name=cipher", "world.params.letters=6"])
    assert cfg.world.params == {"letters": 6} and cfg.world.reward == "exact"


def test_units_are_letters_marked_in_easy_prompts():
    w = world()
    assert w.all_skill_units() == tuple("abcdefghij")
    assert w.skill_units(PromptRecord(id="a", text="aBcdEf")) == {"b", "e"}
    assert w.skill_units(PromptRecord(id="b", text="ABCdef")) == frozenset()  # d = 3 is past the easy levels
    assert make_world("cipher", {"unit_max_difficulty": 3}).skill_units(PromptRecord(id="b", text="ABCdef")) == \
        {"a", "b", "c"}


def evolve(ev, parents, n):
    return asyncio.run(ev.evolve(parents, n, step=2))


def test_harder_marks_one_more_position_of_the_parent_and_easier_unmarks_one():
    w = world()
    parent = w.task("abcdef", {1, 4}).record("p")
    for op, dd in (("harder", 1), ("easier", -1)):
        batch = evolve(CurriculumEvolver(world=w, operators=[op], rng_seed=3), [parent], 4)
        # Only 4 (harder) or 2 (easier) edits exist: a repeat is redrawn, then counted as a duplicate.
        assert batch.counts.ok >= 2 and batch.counts.ok + batch.counts.n_rejected == 4
        assert set(batch.counts.rejected) <= {"duplicate_in_buffer"}
        assert len({c.text for c in batch.children}) == batch.counts.ok
        for child in batch.children:
            assert child.text.lower() == "abcdef" and child.meta["difficulty"] == 2 + dd
            assert child.meta["parent_difficulty"] == 2 and child.operator == op
            marked = {i for i, c in enumerate(child.text) if c.isupper()}
            assert marked >= {1, 4} if op == "harder" else marked <= {1, 4}
            assert exact_reward(child, w.answer(PromptRecord(id="x", text=child.text))) == 1.0
            assert not is_held_out(child.text)


def test_sibling_is_a_fresh_prompt_at_the_same_level_and_the_ends_are_rejected():
    w = world()
    batch = evolve(CurriculumEvolver(world=w, operators=["sibling"], rng_seed=0), [w.task("abcdef", {0}).record("p")],
                   5)
    assert [c.meta["difficulty"] for c in batch.children] == [1] * 5
    assert len({c.text for c in batch.children}) == 5
    top = evolve(CurriculumEvolver(world=w, operators=["harder"]), [w.task("abcdef", set(range(6))).record("t")], 2)
    assert top.counts.rejected == {AT_MAX_DIFFICULTY: 2}
    low = evolve(CurriculumEvolver(world=w, operators=["easier"]), [w.task("abcdef", {2}).record("l")], 2)
    assert low.counts.rejected == {AT_MIN_DIFFICULTY: 2}
    with pytest.raises(ValueError, match="more_terms"):
        CurriculumEvolver(world=w, operators=["more_terms"])  # a chain_sum move, not the cipher's


def test_steering_sends_never_solved_parents_easier_and_always_solved_ones_harder():
    w = world()
    never, always, some, unknown = (w.task("abcdef", {1, 2, 4}).record(i) for i in ("n", "a", "s", "u"))
    never.meta["success_rate"], always.meta["success_rate"], some.meta["success_rate"] = 0.0, 1.0, 0.5
    batch = evolve(CurriculumEvolver(world=w, steer=True, rng_seed=0), [never, always, some, unknown], 3)
    ops = {}
    for child in batch.children:
        ops.setdefault(child.parent_id, set()).add(child.operator)
    for outcome in batch.outcomes:  # rejected attempts (a repeated edit) name their operator too
        ops.setdefault(outcome["parent_id"], set()).add(outcome["operator"])
    assert ops["n"] == {"easier"} and ops["a"] == {"harder"}
    off = evolve(CurriculumEvolver(world=w, rng_seed=0), [never], 12)
    assert {c.operator for c in off.children} > {"easier"}  # without steering the mix decides
