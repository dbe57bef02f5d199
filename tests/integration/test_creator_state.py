"""The creator's state survives a restart: a creator loaded from a checkpoint draws exactly the batches the original
would have, evolve work in flight at the checkpoint is issued again or counted as lost, and lineage.jsonl holds
every prompt the creator handled."""

import asyncio
import hashlib
import json

import numpy as np
import pytest

from actors.creator import Creator
from eva_ray.config import load_config
from eva_ray.evolve.operators import INPUT_MARKER, OUTPUT_MARKER
from eva_ray.lineage import read_lineage
from launch.driver import load_prompts


def world_cfg(*extra):
    return load_config("configs/chain_sum.yaml", ["world.seed_size=40", "creator.capacity=12",
                                                   "creator.batch_size=4", "creator.n_new=2", *extra])


def rewards_for(step: int, n: int) -> list[list[float]]:
    """The rewards a solver would give: fixed per step, so both creators see the same ones."""
    return np.random.default_rng(1000 + step).integers(0, 2, size=(n, 4)).astype(float).tolist()


async def take_steps(creator: Creator, steps: range) -> list[list[str]]:
    ids = []
    for step in steps:
        batch = await creator.next_batch(step)
        ids.append([p.id for p in batch.prompts])
        await creator.report(step, rewards_for(step, len(batch.prompts)))
        await creator.drain(10)
    return ids


def test_a_restored_curriculum_creator_draws_the_batches_the_original_would(tmp_path):
    cfg = world_cfg()
    train, _, _ = load_prompts(cfg)
    original = Creator(cfg, train, run_dir=str(tmp_path / "a"))

    async def walk():
        await take_steps(original, range(0, 9))  # warm-up, mix-up and into bootstrap
        path = await original.save(str(tmp_path / "creator.json"))
        # The restored creator is built as a resumed run builds it: same config, D loaded afresh.
        restored = Creator(cfg, load_prompts(cfg)[0], run_dir=str(tmp_path / "b"))
        assert await restored.load(path) == {"reissued": 0, "lost": 0}
        ahead = await take_steps(original, range(9, 25))
        again = await take_steps(restored, range(9, 25))
        return ahead, again, restored

    ahead, again, restored = asyncio.run(walk())
    assert ahead == again
    assert any(pid.startswith("seed-") for pid in ahead[0]) and any("/s" in pid for ids in ahead for pid in ids)
    assert [r.id for r in original.buffer.records()] == [r.id for r in restored.buffer.records()]
    untimed = {"latencies_s": None}  # wall times differ, everything counted must not
    assert original.seed_used == restored.seed_used
    assert original.counts.to_dict() | untimed == restored.counts.to_dict() | untimed
    assert json.dumps(asyncio.run(original.state_dict())["rng"]) == json.dumps(asyncio.run(restored.state_dict())["rng"])


class GatedLLM:
    """A deterministic evolve LLM: the answer depends on the parent and the operator only; calls wait at a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self, messages):
        self.calls += 1
        await self.gate.wait()
        user = messages[-1]["content"]
        parent = user.split(INPUT_MARKER + "\n", 1)[1].rsplit("\n\n" + OUTPUT_MARKER, 1)[0]
        digest = hashlib.sha256(user.encode()).hexdigest()
        if digest[0] in "01":
            return f"{OUTPUT_MARKER}\n"  # an answer of markers only: rejected as such, and logged
        return f"Consider {parent[:20]!r} again, but as puzzle {digest[:12]} about {digest[12:20]} and {digest[20:28]}?"


def llm_cfg(*extra):
    return load_config(None, ["reward.function=pkg.mod:fn", "creator.batch_size=4", "creator.capacity=8",
                              "creator.n_new=2", "evolve.model=unused/by-the-fake", *extra])


def llm_seeds():
    from eva_ray.records import PromptRecord

    return [PromptRecord(id=f"seed-{i}", text=f"Tell me something surprising about the number {i * 7 + 3}.")
            for i in range(10)]


@pytest.mark.parametrize("mode", ["reissue", "lost"])
def test_evolve_work_in_flight_at_a_checkpoint_is_reissued_exactly_or_counted_lost(tmp_path, mode):
    cfg = llm_cfg()
    llm_a, llm_b = GatedLLM(), GatedLLM()
    original = Creator(cfg, llm_seeds(), run_dir=str(tmp_path / "a"), complete=llm_a)
    restored = Creator(cfg, llm_seeds(), run_dir=str(tmp_path / "b"), complete=llm_b)

    async def walk():
        llm_a.gate.set()
        await take_steps(original, range(0, 2))
        llm_a.gate.clear()
        batch = await original.next_batch(2)
        await original.report(2, rewards_for(2, len(batch.prompts)))
        await asyncio.sleep(0.05)  # the evolve task is now waiting at the LLM
        assert original._in_flight and llm_a.calls > 0
        state = json.loads(json.dumps(await original.state_dict()))  # through JSON, as a checkpoint file is
        llm_b.gate.set()
        loaded = await restored.load_state_dict(state, in_flight=mode)
        llm_a.gate.set()
        await original.drain(10)
        await restored.drain(10)
        return loaded, await take_steps(original, range(3, 8)), await take_steps(restored, range(3, 8))

    loaded, ahead, again = asyncio.run(walk())
    n_requests = 2 * cfg.creator.n_new
    if mode == "reissue":
        assert loaded == {"reissued": n_requests, "lost": 0}
        assert ahead == again  # the same requests, operators included, made the same children
        held = [[(r.id, r.operator, r.text) for r in c.buffer.records()] for c in (original, restored)]
        assert held[0] == held[1]
        untimed = {"latencies_s": None}
        assert original.counts.to_dict() | untimed == restored.counts.to_dict() | untimed
    else:
        assert loaded == {"reissued": 0, "lost": n_requests}
        assert asyncio.run(restored.stats())["creator"]["evolve_lost"] == n_requests
        born_at_2 = [[e for e in read_lineage(tmp_path / run / "lineage.jsonl")
                      if e["event"] == "added" and e["step"] == 2] for run in ("a", "b")]
        assert born_at_2[0] and not born_at_2[1]  # the original's step-2 children never reached the restored one
        lost = [e for e in read_lineage(tmp_path / "b" / "lineage.jsonl") if e["event"] == "lost"]
        assert lost == [{"event": "lost", "step": 2, "requests": n_requests, "parent_ids": lost[0]["parent_ids"]}]


def test_lineage_logs_every_prompt_as_it_happens_and_is_cut_back_on_resume(tmp_path):
    cfg = llm_cfg("creator.capacity=6")
    llm = GatedLLM()
    llm.gate.set()
    creator = Creator(cfg, llm_seeds(), run_dir=str(tmp_path / "run"), complete=llm)

    async def walk():
        await take_steps(creator, range(0, 4))
        state = await creator.state_dict()
        await take_steps(creator, range(4, 6))
        return state

    state = asyncio.run(walk())
    path = tmp_path / "run" / "lineage.jsonl"
    events = read_lineage(path)  # written as it happened: readable before the creator is closed
    kinds = {e["event"] for e in events}
    assert {"trained", "added", "rejected", "evicted"} <= kinds
    trained = [e for e in events if e["event"] == "trained"]
    assert [e["step"] for e in trained] == [s for s in range(6) for _ in range(4)]
    added = {e["record"]["id"]: e["record"] for e in events if e["event"] == "added"}
    assert all(r["parent_id"] and r["operator"] and r["text"] for r in added.values())
    # Every evolved prompt that was trained on was logged when it was made, with its lineage.
    assert {e["id"] for e in trained if e["source"] == "evolved"} <= set(added)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert rejected and all(e["reason"] == "only_markers" and e["text"] for e in rejected)
    assert sum(e["event"] == "rejected" for e in events) == creator.counts.n_rejected
    evicted = {e["id"] for e in events if e["event"] == "evicted"}
    assert evicted <= set(added) and not evicted & {r.id for r in creator.buffer.records()}

    # Resuming from the step-4 checkpoint drops the events of steps 4-5, which the resumed run makes again.
    resumed = Creator(cfg, llm_seeds(), run_dir=str(tmp_path / "run"), complete=llm)
    asyncio.run(resumed.load_state_dict(state))
    after = read_lineage(path)
    assert after[:-1] == events[:len(after) - 1] and after[-1]["event"] == "resumed"
    assert max(e["step"] for e in after if e["event"] == "trained") == 3
