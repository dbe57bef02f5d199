"""The curriculum evolver: difficulty moves, lineage, rejections and duplicate handling on the chain_sum world."""

import asyncio
import types

import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

from eva_ray.evolve.curriculum import (  # noqa: E402
    AT_MAX_DIFFICULTY,
    AT_MIN_DIFFICULTY,
    NOT_A_TASK,
    CurriculumEvolver,
    ExactTextValidator,
)
from eva_ray.evolve.validate import DUPLICATE_IN_BUFFER, EvolveValidator  # noqa: E402
from eva_ray.records import PromptRecord, child_id  # noqa: E402
from eva_ray.worlds import chain_sum as w  # noqa: E402
from eva_ray.worlds import make_world  # noqa: E402
from eva_ray.worlds.chain_sum import AT_MAX_TERMS  # noqa: E402


def parent(d: int, k: int = 2, seed: int = 0, pid: str | None = None, info: float | None = 0.5) -> PromptRecord:
    task = w.sample_task(d, k, np.random.default_rng(seed))
    record = task.record(pid or f"seed-d{d}-{seed}")
    record.info = info
    return record


def evolve(ev: CurriculumEvolver, parents, n: int, step: int = 3):
    return asyncio.run(ev.evolve(parents, n, step=step))


def total(counts) -> int:
    return counts.ok + counts.n_rejected + counts.n_failed


def all_level_1_expressions() -> list[str]:
    return [f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in "+-"]


def test_children_have_lineage_and_correct_meta():
    parents = [parent(2, seed=1), parent(3, seed=2)]
    ev = CurriculumEvolver(rng_seed=0)
    batch = evolve(ev, parents, 4, step=7)
    assert batch.counts.requested == 8 and total(batch.counts) == 8 and batch.children
    by_id = {p.id: p for p in parents}
    for child in batch.children:
        p = by_id[child.parent_id]
        assert child.source == "evolved" and child.generation == 1 and child.step_born == 7
        assert child.operator in ("harder", "sibling", "easier")
        assert child.id.startswith(f"{p.id}/s7c") and child.info == p.info and not child.info_measured
        assert child.meta["answer"] == str(w.evaluate_expression(child.text))
        assert w.reward(child, child.meta["answer"]) == 1.0
        assert child.meta["parent_difficulty"] == p.meta["difficulty"] and child.meta["evolve_method"] == "curriculum"
        assert not w.is_held_out(child.text)  # evolution never reaches the evaluation partition
    grandchildren = evolve(ev, batch.children[:1], 2, step=8).children
    assert all(g.generation == 2 and g.parent_id == batch.children[0].id for g in grandchildren)


@pytest.mark.parametrize("op, dd, dk", [("harder", 1, 0), ("easier", -1, 0), ("sibling", 0, 0), ("more_terms", 0, 1)])
def test_each_operator_moves_the_difficulty_its_way(op, dd, dk):
    p = parent(3)
    batch = evolve(CurriculumEvolver(operators=[op], rng_seed=1), [p], 5)
    assert batch.counts.ok == 5 and [c.operator for c in batch.children] == [op] * 5
    for c in batch.children:
        assert (c.meta["difficulty"], c.meta["num_terms"]) == (3 + dd, 2 + dk)
        assert w.infer_meta(c.text)["difficulty"] == 3 + dd and len(w.parse_expression(c.text)[0]) == 2 + dk


def test_at_the_cap_the_attempt_is_rejected_and_counted():
    ev = CurriculumEvolver(operators=["harder"], rng_seed=0)
    batch = evolve(ev, [parent(5)], 3)
    assert batch.children == [] and batch.counts.rejected == {AT_MAX_DIFFICULTY: 3} and total(batch.counts) == 3
    assert ev.validator.rejections[AT_MAX_DIFFICULTY] == 3
    low = evolve(CurriculumEvolver(operators=["easier"]), [parent(1)], 2)
    assert low.counts.rejected == {AT_MIN_DIFFICULTY: 2}
    capped = evolve(CurriculumEvolver(operators=["harder"], max_difficulty=3), [parent(3), parent(2)], 1)
    assert capped.counts.rejected == {AT_MAX_DIFFICULTY: 1} and capped.children[0].meta["difficulty"] == 3
    terms = evolve(CurriculumEvolver(world=make_world("chain_sum", {"max_terms": 2}), operators=["more_terms"]), [parent(2)], 1)
    assert terms.counts.rejected == {AT_MAX_TERMS: 1}


@pytest.mark.parametrize("validator", [ExactTextValidator(), EvolveValidator()], ids=["exact", "default"])
def test_a_child_already_in_the_buffer_is_a_counted_duplicate(validator):
    for text in all_level_1_expressions():  # the buffer already holds every level-1 task
        validator.register(text)
    ev = CurriculumEvolver(operators=["easier"], validator=validator, rng_seed=0, max_tries=3)
    batch = evolve(ev, [parent(2, seed=s, pid=f"p{s}") for s in range(3)], 2)
    assert batch.children == [] and batch.counts.rejected == {DUPLICATE_IN_BUFFER: 6} and total(batch.counts) == 6


def test_accepted_children_are_registered_so_siblings_never_repeat():
    validator = ExactTextValidator()
    ev = CurriculumEvolver(operators=["sibling"], validator=validator, rng_seed=0, max_tries=1)
    batch = evolve(ev, [parent(1, seed=s, pid=f"p{s}") for s in range(10)], 20)  # 200 draws from ~160 tasks
    texts = [c.text for c in batch.children]
    assert len(texts) == len(set(texts)) and all(t in validator for t in texts)
    assert batch.counts.rejected[DUPLICATE_IN_BUFFER] > 0 and total(batch.counts) == 200
    validator.unregister(texts[0])
    assert texts[0] not in validator


def test_exact_validator_keeps_operators_apart():
    v = ExactTextValidator()
    v.register("57-87=")
    assert v.reason("57+87=", "1+1=") is None
    assert v.reason("57 - 87 =", "1+1=") == DUPLICATE_IN_BUFFER
    assert v.reason("1+1=", "1+1=") == "near_duplicate_parent"
    assert EvolveValidator().reason("57+87=", "57-87=") == "near_duplicate_parent"  # why worlds need the exact one
    # The inherited check() passes the request's wording along; the exact validator accepts and ignores it.
    assert v.check("57 - 87 =", "1+1=", "Make a harder task.") == (None, DUPLICATE_IN_BUFFER)
    assert v.check("12+5=", "1+1=") == ("12+5=", None)


def test_counts_always_sum_and_the_evolver_is_deterministic():
    parents = [parent(d, seed=d, pid=f"p{d}") for d in (1, 2, 3, 4, 5)]
    weights = {"harder": 1.0, "sibling": 1.0, "easier": 1.0, "more_terms": 0.5}

    def run():
        ev = CurriculumEvolver(world=make_world("chain_sum", {"max_terms": 3}), weights=weights, rng_seed=11)
        return evolve(ev, parents, 6)

    a, b = run(), run()
    assert total(a.counts) == a.counts.requested == 30 and len(a.counts.latencies_s) == 30
    assert [(c.id, c.text, c.operator) for c in a.children] == [(c.id, c.text, c.operator) for c in b.children]
    assert a.counts.to_dict() | {"latencies_s": None} == b.counts.to_dict() | {"latencies_s": None}


def test_operator_weights_are_respected():
    ev = CurriculumEvolver(operators=["harder", "sibling"], weights=[0.0, 1.0], rng_seed=0)
    assert {c.operator for c in evolve(ev, [parent(2)], 10).children} == {"sibling"}
    ev = CurriculumEvolver(weights={"harder": 3.0, "easier": 1.0}, rng_seed=0)
    ops = [c.operator for c in evolve(ev, [parent(3, seed=s, pid=f"p{s}") for s in range(20)], 10).children]
    assert 0.65 < ops.count("harder") / len(ops) < 0.85
    for bad in (dict(operators=["bogus"]), dict(operators=["harder"], weights=[-1.0]),
                dict(operators=["harder", "harder"]), dict(weights=[1.0]), dict(max_tries=0)):
        with pytest.raises(ValueError):
            CurriculumEvolver(**bad)


def test_parents_without_meta_or_not_tasks():
    bare = PromptRecord(id="bare", text="57-87=")
    batch = evolve(CurriculumEvolver(operators=["harder"]), [bare, PromptRecord(id="poem", text="Write a poem.")], 2)
    assert [c.meta["difficulty"] for c in batch.children] == [3, 3]
    assert batch.counts.rejected == {NOT_A_TASK: 2}


def test_a_broken_world_is_a_counted_failure_not_a_dead_batch():
    class Broken(w.ChainSumWorld):
        def draw_task(self, knobs, rng):
            raise RuntimeError("generator down")

    world = Broken()
    batch = evolve(CurriculumEvolver(world=world, operators=["sibling"]), [parent(2)], 3)
    assert batch.children == [] and batch.counts.failed == {"RuntimeError": 3} and total(batch.counts) == 3


def test_tree_bon_is_not_supported():
    with pytest.raises(NotImplementedError):
        asyncio.run(CurriculumEvolver().evolve_tree_bon(parent(2), width=2, depth=2, scorer=len, step=0))
