"""Rollout overlapped with learning (run.overlap): the schedule's invariants, the staleness bound, the learner's
importance weights on a real DeepSpeed engine, and actor threads under a real Ray instance."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig, load_config
from eva_ray.schedule import PhaseSettings, phase_of

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------- the learner


def make_learner(path: str, correction: str, **learner_kw):
    from actors.learner import Learner

    return Learner(path, solver=SolverConfig(algorithm="rloo", beta=0.0),
                   learner=LearnerConfig(zero_stage=0, lr=1e-3, micro_batch_size=8, lr_schedule="constant",
                                         warmup_ratio=0.0, off_policy_correction=correction, **learner_kw),
                   model=ModelConfig(), total_steps=10, seed=0)


def own_logprobs(learner, batch) -> torch.Tensor:
    """[B, R] the learner's log-probs of ``batch`` at its current weights (what an engine in step would report)."""
    with torch.no_grad():
        lp, _ = learner._logprobs(learner.engine, batch.to(learner.device))
    return lp.float().cpu()


def test_lagging_rollouts_get_truncated_or_dropped_weights_and_current_ones_none(tmp_path):
    from eva_ray.batching import collate
    from eva_ray.rollouts import Rollout
    from eva_ray.tiny import save_tiny_models

    path = save_tiny_models(tmp_path)["policy"]
    g = torch.Generator().manual_seed(0)
    groups = [[Rollout(f"p{p}", [7 + p, 20, 30], [int(t) for t in torch.randint(7, 103, (6,), generator=g)], "",
                       "length", 0) for _ in range(4)] for p in range(4)]
    rewards = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    norms = {}
    for correction in ("none", "tis", "icepop"):
        learner = make_learner(path, correction, is_cap=2.0, icepop_low=0.5, icepop_high=2.0)
        try:
            first = collate(groups, rewards, pad_token_id=0)
            # Version 0 sampled version 0's batch: nothing lags, every weight is exactly 1.
            m0 = learner.train_step(dataclasses.replace(first, behaviour_logprobs=own_logprobs(learner, first) - 3))
            assert m0["train/updates"] == 1 and m0["train/staleness_max"] == 0
            if correction != "none":
                assert m0["train/is_lagging_fraction"] == 0 and m0["train/is_ratio_mean"] == 1.0
                assert m0["train/is_clipped_fraction"] == 0
            # Now the learner is at version 1 and the batch comes from version 0, sampled where every token was
            # 4 times less likely than the learner now finds it (ratio 4: above both bounds).
            lagging = collate(groups, rewards, pad_token_id=0)
            behaviour = own_logprobs(learner, lagging) - math.log(4.0)
            m1 = learner.train_step(dataclasses.replace(lagging, behaviour_logprobs=behaviour))
        finally:
            learner.close()
        assert m1["train/staleness_max"] == 1
        norms[correction] = m1["train/grad_norm"]
        if correction != "none":
            assert m1["train/is_lagging_fraction"] == 1
            assert m1["train/is_ratio_mean"] == pytest.approx(4.0, rel=1e-4)
            assert m1["train/is_clipped_fraction"] == 1  # every token was truncated (tis) or dropped (icepop)
    # beta = 0: the gradient is the policy term alone, so TIS's weight 2 doubles it and IcePop's 0 removes it.
    assert norms["tis"] == pytest.approx(2 * norms["none"], rel=1e-4)
    assert norms["icepop"] == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------- the driver


def world_config(tmp_path, **overrides):
    """A short chain_sum run whose phases all happen: a small D and buffer, checkpoints mid-run."""
    return load_config(None, [
        "run.total_steps=23", f"run.output_dir={tmp_path}", "run.overlap=on", "model.path=world:chain_sum_solver",
        "world.name=chain_sum", "world.seed_size=60", "world.eval_per_level=4", "creator.batch_size=8",
        "creator.capacity=16", "creator.n_new=4", "creator.n_new_bootstrap=2", "creator.snapshot_every=0",
        "evolve.method=curriculum", "solver.n_responses=4", "rollout.max_new_tokens=8", "reward.backend=function",
        "learner.zero_stage=0", "learner.lr=1e-4", "learner.checkpoint_every=7", "logging.eval_every=0",
        "logging.wandb_mode=disabled", "logging.progress=false", *(f"{k}={v}" for k, v in overrides.items())])


@pytest.fixture
def recorded(monkeypatch):
    """Every next_batch (with the creator's state when it planned), report and train_step, in call order."""
    from actors.creator import Creator
    from actors.learner import Learner

    events: list[tuple] = []
    next_batch, report, train_step = Creator.next_batch, Creator.report, Learner.train_step

    async def spy_next_batch(self, step):
        state = self._state(step)
        buffered = {r.id for r in self.buffer.records()}
        batch = await next_batch(self, step)
        events.append(("plan", step, [r.id for r in batch.prompts], batch.phase, state, buffered,
                       sum(batch.from_buffer)))
        return batch

    async def spy_report(self, step, rewards):
        events.append(("report", step))
        return await report(self, step, rewards)

    def spy_train(self, batch, **kw):
        events.append(("train", list(batch.prompt_ids)))
        return train_step(self, batch, **kw)

    monkeypatch.setattr(Creator, "next_batch", spy_next_batch)
    monkeypatch.setattr(Creator, "report", spy_report)
    monkeypatch.setattr(Learner, "train_step", spy_train)
    return events


def test_every_planned_prompt_is_trained_once_through_phase_changes_checkpoints_and_the_end(tmp_path, recorded):
    from launch.driver import run

    cfg = world_config(tmp_path)
    summary = run(cfg, inline=True, echo=lambda line: None)
    assert summary.steps_done == 23 and summary.error is None
    plans = [e for e in recorded if e[0] == "plan"]
    trains = [e[1] for e in recorded if e[0] == "train"]
    # One plan per step, in order, each trained once, by the next train_step, in the same order: none dropped at
    # the pipeline's start, at phase changes, around the checkpoints of steps 7, 14, 21 or at the end.
    assert [e[1] for e in plans] == list(range(23))
    assert trains == [e[2] for e in plans]
    ids = [i for e in plans for i in e[2]]
    assert len(ids) == len(set(ids))  # no prompt trained twice (D is used once, buffer entries are popped)
    order = [e[:2] for e in recorded if e[0] in ("plan", "report")]
    for step in range(22):  # step t's report reaches the creator before it plans step t + 1
        assert order.index(("report", step)) < order.index(("plan", step + 1))
    for _, step, batch_ids, phase, state, buffered, _ in plans:
        assert phase == phase_of(state, PhaseSettings.from_config(cfg.creator))
        if step:  # buffer entries trained at step t - 1 were popped before step t was planned
            previous = plans[step - 1]
            assert not (set(previous[2]) & buffered)
    phases = summary.phases
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == ["warm-up", "mix-up", "bootstrap"]
    assert summary.checkpoint["step"] == 23 and summary.max_staleness_seen == 1
    assert summary.final["creator"]["buffer_popped"] == sum(e[6] for e in plans) > 0


def test_the_staleness_bound_still_raises_in_the_overlapped_loop(tmp_path, monkeypatch):
    from launch.cluster import System
    from launch.driver import StalePolicyError, run

    # Weight pushes that silently do nothing: the rollouts keep coming from version 0 while the learner moves on.
    monkeypatch.setattr(System, "sync_weights", lambda self, **kw: {"bytes": 0, "buckets": 0, "seconds": 0.0})
    with pytest.raises(StalePolicyError, match="lags 2 policy versions"):
        run(world_config(tmp_path, **{"run.total_steps": 6, "learner.checkpoint_every": 0}), inline=True,
            echo=lambda line: None)


def test_overlap_on_needs_a_staleness_bound_that_allows_it():
    from eva_ray.config import ConfigError

    default = Path(__file__).resolve().parents[2] / "configs" / "chain_sum.yaml"
    with pytest.raises(ConfigError, match="run.overlap"):
        load_config(default, ["run.overlap=on", "learner.max_staleness=0"])
    with pytest.raises(ConfigError, match="off_policy_correction"):
        load_config(default, ["learner.off_policy_correction=tis", "solver.algorithm=oaif"])


def test_auto_is_on_under_ray_off_inline_and_brings_tis():
    from launch.driver import with_resolved_overlap

    default = Path(__file__).resolve().parents[2] / "configs" / "chain_sum.yaml"
    cfg = load_config(default)
    on, off = with_resolved_overlap(cfg, inline=False), with_resolved_overlap(cfg, inline=True)
    assert (on.run.overlap, on.learner.off_policy_correction) == ("on", "tis")
    assert (off.run.overlap, off.learner.off_policy_correction) == ("off", "none")
    bounded = with_resolved_overlap(load_config(default, ["learner.max_staleness=0"]), inline=False)
    assert bounded.run.overlap == "off"


# ----------------------------------------------------------------------------------------------- threads


class Probe:
    def __init__(self, value: int) -> None:
        self.value = value


def test_actors_compute_with_as_many_threads_as_cpus_they_were_given():
    import ray

    from eva_ray.config import ActorResources
    from launch.threads import thread_count, thread_env, with_threads

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seen = {}
        for resources in (ActorResources(num_cpus=2), ActorResources(num_cpus=0.5),
                          ActorResources(num_cpus=2, num_threads=1)):
            threads = thread_count(resources)
            actor = ray.remote(with_threads(Probe, threads)).options(
                num_cpus=resources.num_cpus, runtime_env={"env_vars": thread_env(threads)}).remote(3)
            seen[(resources.num_cpus, resources.num_threads)] = ray.get(actor.eva_threads.remote(), timeout=120)
            assert ray.get(actor.__ray_call__.remote(lambda a: (type(a).__name__, a.value))) == ("Probe", 3)
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    assert seen[(2, 0)] == {"torch": 2, "OMP_NUM_THREADS": "2"}
    assert seen[(0.5, 0)] == {"torch": 1, "OMP_NUM_THREADS": "1"}
    assert seen[(2, 1)] == {"torch": 1, "OMP_NUM_THREADS": "1"}
