"""creator.child_scoring=probe: children wait to be measured, enter the buffer at their measured score or are dropped."""

import asyncio
import math

import pytest

from actors.creator import Creator
from eva_ray.config import load_config
from eva_ray.worlds import chain_sum


def make_cfg(*extra):
    return load_config(None, [
        "world.name=chain_sum", "evolve.method=curriculum", "reward.backend=function",
        "reward.function=eva_ray.worlds.chain_sum:exact_reward", "creator.batch_size=4", "creator.capacity=16",
        "creator.n_new=2", "creator.probe_responses=4", *extra])


def seeds():
    return chain_sum.seed_set(8, {2: 1.0, 3: 1.0}, seed=0)


# Rewards for a 4-prompt minibatch: prompts 0 and 1 have a spread, so they are the two parents (top half).
SPREAD_BATCH = [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0] * 4, [0.0] * 4]


async def first_step(creator):
    batch = await creator.next_batch(0)
    await creator.report(0, SPREAD_BATCH[:len(batch.prompts)])
    return batch


def test_probe_children_wait_then_enter_at_their_measured_score_or_are_dropped(tmp_path):
    creator = Creator(make_cfg("creator.child_scoring=probe"), seeds(), run_dir=str(tmp_path))

    async def walk():
        await first_step(creator)
        queued = await creator.probe_requests()
        assert len(queued) == 4 and len(creator.buffer) == 0  # 2 parents x 2 children, none drawable yet
        assert [c.id for c in await creator.probe_requests()] == [c.id for c in queued]  # still queued until reported
        ids = [c.id for c in queued]
        rows = [[1.0, 1.0, 1.0, 1.0],  # flat: no signal, dropped
                [0.0, 1.0, 1.0, 1.0],  # spread: admitted at max - mean = 0.25
                [math.nan] * 4,  # unmeasured: admitted at the inherited score
                [0.0, 0.0, 0.0, 1.0]]  # spread: admitted at 0.75
        inherited = queued[2].info
        out = await creator.report_probes(1, ids, rows)
        assert (out["probed"], out["admitted"], out["dropped"], out["unmeasured"]) == (4, 3, 1, 1)
        assert out["probe_rollouts"] == 16
        assert out["scores"] == pytest.approx({ids[0]: 0.0, ids[1]: 0.25, ids[3]: 0.75})
        assert ids[0] not in creator.buffer and len(creator.buffer) == 3
        assert creator.buffer.get(ids[1]).info == pytest.approx(0.25) and creator.buffer.get(ids[1]).info_measured
        assert creator.buffer.get(ids[3]).info == pytest.approx(0.75)
        assert creator.buffer.get(ids[2]).info == inherited and not creator.buffer.get(ids[2]).info_measured
        assert await creator.probe_requests() == []
        creator.buffer._check_invariants()
        stats = (await creator.stats())["creator"]
        # 4 prompts x 4 trained rollouts, 4 children x 4 probe rollouts: both are in the run's total.
        assert (stats["rollouts_trained"], stats["rollouts_probe"], stats["rollouts_total"]) == (16, 16, 32)
        assert (stats["probe_probed"], stats["probe_admitted"], stats["probe_dropped"]) == (4, 3, 1)
        # The dropped child's text is free again: the same task may be evolved later.
        assert queued[0].prompt_text not in creator.validator and queued[1].prompt_text in creator.validator
        await creator.close()

    asyncio.run(walk())
    events = [line for line in (tmp_path / "lineage.jsonl").read_text().splitlines() if '"probed"' in line]
    assert len(events) == 4


def test_keep_flat_admits_children_without_spread():
    creator = Creator(make_cfg("creator.child_scoring=probe", "creator.probe_keep_flat=true"), seeds())

    async def walk():
        await first_step(creator)
        queued = await creator.probe_requests()
        out = await creator.report_probes(1, [c.id for c in queued], [[0.0] * 4 for _ in queued])
        assert out["dropped"] == 0 and len(creator.buffer) == len(queued)
        assert all(r.info == 0.0 and r.info_measured for r in creator.buffer.records())
        await creator.close()

    asyncio.run(walk())


def test_inherit_is_unchanged_and_asks_for_no_probes():
    creator = Creator(make_cfg(), seeds())

    async def walk():
        batch = await first_step(creator)
        await asyncio.sleep(0)
        assert await creator.probe_requests() == []
        assert len(creator.buffer) == 4  # children entered at once
        parents = {p.id: p.info for p in batch.prompts}
        assert all(r.info == parents[r.parent_id] and not r.info_measured for r in creator.buffer.records())
        stats = (await creator.stats())["creator"]
        assert stats["rollouts_total"] == stats["rollouts_trained"] == 16 and stats["rollouts_probe"] == 0
        assert "probe_probed" not in stats
        await creator.close()

    asyncio.run(walk())


def test_report_probes_refuses_children_it_did_not_queue():
    creator = Creator(make_cfg("creator.child_scoring=probe"), seeds())

    async def walk():
        await first_step(creator)
        queued = await creator.probe_requests()
        with pytest.raises(ValueError, match="reward rows"):
            await creator.report_probes(1, [c.id for c in queued], [])
        with pytest.raises(KeyError, match="not waiting"):
            await creator.report_probes(1, ["nope"], [[0.0, 1.0]])
        await creator.close()

    asyncio.run(walk())


def test_the_probe_queue_and_counts_survive_a_resume():
    cfg = make_cfg("creator.child_scoring=probe")
    creator = Creator(cfg, seeds())

    async def walk():
        await first_step(creator)
        queued = await creator.probe_requests()
        state = await creator.state_dict()
        await creator.close()
        resumed = Creator(cfg, seeds())
        await resumed.load_state_dict(state)
        assert [c.id for c in await resumed.probe_requests()] == [c.id for c in queued]
        assert (await resumed.stats())["creator"]["rollouts_trained"] == 16
        out = await resumed.report_probes(1, [c.id for c in queued], [[0.0, 1.0, 1.0, 1.0]] * len(queued))
        assert out["admitted"] == len(queued)
        await resumed.close()

    asyncio.run(walk())
