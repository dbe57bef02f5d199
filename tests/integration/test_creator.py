"""The creator actor, inline: real LiteLLM calls answered by a tiny local model, the buffer, the phases."""

import asyncio

import numpy as np
import pytest

from actors.creator import Creator, CreatorStarved
from eva_ray.config import load_config
from eva_ray.records import PromptRecord
from eva_ray.tiny import save_tiny_models


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


def make_cfg(tiny_paths, *extra):
    return load_config(None, [
        "reward.function=pkg.mod:fn", "creator.batch_size=4", "creator.capacity=8", "creator.n_new=2",
        "creator.n_new_bootstrap=2", "creator.bootstrap_wait_s=20", "evolve.model=local/tiny",
        f"evolve.local_model_path={tiny_paths['policy']}", "evolve.max_tokens=24", "evolve.timeout_s=30", *extra])


def seeds(n):
    return [PromptRecord(id=f"seed-{i}", text=f"Tell me something about the number {i * 7 + 3}.") for i in range(n)]


def test_online_phases_with_real_litellm_calls(tiny_paths):
    cfg = make_cfg(tiny_paths)
    creator = Creator(cfg, seeds(16))
    rng = np.random.default_rng(0)

    async def walk():
        phases, in_flight_after_report = [], []
        for step in range(10):
            batch = await creator.next_batch(step)
            phases.append(batch.phase)
            assert len(batch.prompts) == 4
            await creator.report(step, rng.normal(size=(4, 3)).tolist())
            in_flight_after_report.append(len(creator._tasks))
            await creator.drain(60)  # let this step's children land before the next plan, to make phases exact
        stats = await creator.stats()
        provider = await creator.provider_stats()
        await creator.close()
        return phases, in_flight_after_report, stats, provider

    phases, in_flight, stats, provider = asyncio.run(walk())
    # 16 seeds, +4 children a step: warm-up 2 steps (8 seeds), mix-up 4 steps (2 seeds each), then bootstrap.
    assert phases == ["warm-up"] * 2 + ["mix-up"] * 4 + ["bootstrap"] * 4
    assert all(n == 1 for n in in_flight)  # report returned while its evolve task was still running
    c = stats["creator"]
    assert c["evolve_requested"] == c["evolve_ok"] + c["evolve_rejected_total"] + c["evolve_failed_total"] > 0
    assert c["llm_calls"] == provider["completed"] > 0  # every evolve call went through LiteLLM to the provider
    # Buffer prompts became parents in mix-up and bootstrap: their children are generation 2.
    assert {row[4] for row in creator.evolved_rows} >= {1, 2}
    assert stats["buffer"]["size"] <= cfg.creator.capacity
    for record in creator.buffer.records():
        assert record.source == "evolved" and record.parent_id and record.operator
        assert record.step_born >= 0 and record.info is not None


def test_starved_bootstrap_waits_boundedly_then_says_why(tiny_paths):
    async def broken(messages):
        raise ConnectionError("provider down")

    cfg = make_cfg(tiny_paths, "creator.bootstrap_wait_s=0.5", "evolve.retry_backoff_s=0")
    creator = Creator(cfg, seeds(4), complete=broken)

    async def walk():
        batch = await creator.next_batch(0)
        assert batch.phase == "warm-up"
        await creator.report(0, [[1.0, 0.0]] * 4)
        await creator.drain(5)
        with pytest.raises(CreatorStarved, match="D is used up and the buffer is empty"):
            await creator.next_batch(1)
        return await creator.stats()

    stats = asyncio.run(walk())
    # Counted by cause, after the configured 3 retries of each of the 4 requests.
    assert stats["creator"]["evolve_failed"] == {"connection": 4}
    assert stats["creator"]["llm_retried"] == {"connection": 12} and stats["creator"]["llm_retries"] == 12


def test_report_measures_informativeness_and_picks_the_top_half(tiny_paths):
    async def echo_child(messages):
        return "A different question about prime numbers and their gaps."

    creator = Creator(make_cfg(tiny_paths, "creator.metric=a_min"), seeds(8), complete=echo_child)

    async def walk():
        batch = await creator.next_batch(0)
        rewards = [[0.0, 1.0, 0.5], [0.2, 0.2, 0.2], [0.0, 3.0, 1.0], [float("nan"), float("nan"), float("nan")]]
        out = await creator.report(0, rewards)
        await creator.drain(5)
        return batch, out

    batch, out = asyncio.run(walk())
    assert out["scores"][:3] == [1.0, 0.0, 3.0] and np.isnan(out["scores"][3])
    assert out["parents"] == [batch.prompts[2].id, batch.prompts[0].id]  # greedy top 2 of 4
    assert batch.prompts[2].info == 3.0 and batch.prompts[2].info_measured
    assert batch.prompts[3].info is None  # no valid reward: no score
    children = list(creator.buffer.records())
    assert {c.parent_id for c in children} <= set(out["parents"])
    # Same text for every child: the first is kept, the rest are rejected as duplicates, and all are counted.
    assert creator.counts.ok == 1 and creator.counts.rejected["duplicate_in_buffer"] == 3


def test_method_none_is_the_static_baseline(tiny_paths):
    cfg = make_cfg(tiny_paths, "evolve.method=none", "creator.seed_epochs=3")
    creator = Creator(cfg, seeds(8))

    async def walk():
        phases = []
        for step in range(5):
            batch = await creator.next_batch(step)
            phases.append(batch.phase)
            await creator.report(step, [[0.0, 1.0]] * 4)
        return phases, await creator.stats()

    phases, stats = asyncio.run(walk())
    assert phases == ["warm-up"] * 5 and len(creator.buffer) == 0
    assert stats["creator"]["evolve_requested"] == 0 and creator.seed_used == 20  # D re-walked: 3 epochs of 8


def test_a_model_litellm_cannot_route_is_one_clear_error_at_start_up(tiny_paths):
    from actors.creator import EvolveLLMError

    cfg = load_config(None, ["reward.function=pkg.mod:fn", "evolve.model=nosuchprovider/tiny"])
    with pytest.raises(EvolveLLMError, match=r"evolve.model 'nosuchprovider/tiny': LiteLLM cannot route it") as err:
        Creator(cfg, seeds(4))
    assert "\n" not in str(err.value)


def test_real_litellm_faults_are_counted_by_cause_and_a_wrong_model_name_stops_the_run(tiny_paths):
    import time

    from actors.creator import EvolveLLMError
    from actors.local_llm import register_local_provider, unregister_local_provider

    handler = register_local_provider(tiny_paths["policy"], provider="faulty", name="tiny", load_now=True)
    real_generate = handler.model.generate
    try:
        # A provider slower than the per-attempt timeout: every attempt ends in litellm.Timeout, retried once.
        def slow(*args, **kwargs):
            time.sleep(2.0)
            return real_generate(*args, **kwargs)

        handler.model.generate = slow
        cfg = load_config(None, ["reward.function=pkg.mod:fn", "creator.batch_size=4", "creator.n_new=2",
                                 "evolve.model=faulty/tiny", "evolve.max_tokens=4", "evolve.timeout_s=1",
                                 "evolve.max_retries=1", "evolve.retry_backoff_s=0"])
        creator = Creator(cfg, seeds(8))

        async def one_step(c):
            batch = await c.next_batch(0)
            await c.report(0, [[0.0, 1.0]] * len(batch.prompts))
            await c.drain(30)
            return (await c.stats())["creator"]

        stats = asyncio.run(one_step(creator))
        assert stats["evolve_failed"] == {"timeout": 4} and stats["llm_retried"] == {"timeout": 4}
        assert handler.stats()["calls"] == 8  # both attempts of each request reached the provider through LiteLLM
        handler.model.generate = real_generate

        # A model name the provider does not serve: 404 on every call, never retried, and the run is stopped.
        cfg = load_config(None, ["reward.function=pkg.mod:fn", "creator.batch_size=4", "creator.n_new=2",
                                 "evolve.model=faulty/other", "evolve.max_tokens=4", "evolve.retry_backoff_s=0"])
        wrong = Creator(cfg, seeds(8))
        stats = asyncio.run(one_step(wrong))
        assert stats["evolve_failed"] == {"not_found": 4} and stats["llm_retries"] == 0
        with pytest.raises(EvolveLLMError, match=r"all 4 evolve calls of the first batch failed .*not_found.*"
                                                 r"'faulty/other' is misconfigured"):
            asyncio.run(wrong.next_batch(1))
    finally:
        handler.model.generate = real_generate
        unregister_local_provider("faulty")
