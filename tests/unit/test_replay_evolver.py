"""evolve.method=replay: the 'no evolving' ablation re-admits each parent once, as itself, under a new id."""

import asyncio

from eva_ray.config import load_config
from eva_ray.evolve.methods import build_evolver, make_validator
from eva_ray.worlds import make_world


def test_each_parent_comes_back_once_with_its_text_and_lineage():
    cfg = load_config(None, ["world.name=cipher", "evolve.method=replay"])
    evolver = build_evolver(cfg, make_validator(cfg), llm=lambda: None)
    w = make_world("cipher")
    parents = [w.task("abcdef", {1}).record("p0"), w.task("ghijab", {0, 2}).record("p1")]
    parents[0].meta["success_rate"] = 0.25
    batch = asyncio.run(evolver.evolve(parents, 4, step=3))
    assert [c.text for c in batch.children] == [p.text for p in parents]
    assert [c.parent_id for c in batch.children] == ["p0", "p1"] and {c.operator for c in batch.children} == {"replay"}
    assert all(c.id != c.parent_id and c.generation == 1 and c.meta["answer"] for c in batch.children)
    assert "success_rate" not in batch.children[0].meta  # measured again when it is trained again
    assert batch.counts.requested == batch.counts.ok == 2
