"""launch.probing.probe_children against the real inline actors: the shipped chain_sum solver measures children."""

import pytest

from eva_ray.config import load_config
from launch.cluster import start_system
from launch.driver import load_prompts, with_resolved_models, with_world_defaults
from launch.handles import gather
from launch.probing import probe_children


def _system(tmp_path, *extra):
    cfg = load_config("configs/chain_sum.yaml", [
        f"run.output_dir={tmp_path}", "world.seed_size=24", "world.level_mix=[0, 0.5, 0.5, 0, 0]",
        "world.eval_per_level=0", "creator.batch_size=4", "creator.capacity=32", "solver.n_responses=4",
        "creator.probe_responses=3", *extra])
    cfg = with_world_defaults(with_resolved_models(cfg))
    train, _, _ = load_prompts(cfg)
    return cfg, start_system(cfg, train, tmp_path, inline=True, echo=lambda line: None)


class _NoCalls:
    def __getattr__(self, name):
        raise AssertionError(f"probe_children touched system.{name} under child_scoring=inherit")


def test_inherit_makes_no_calls():
    cfg = load_config("configs/chain_sum.yaml")
    assert cfg.creator.child_scoring == "inherit"
    assert probe_children(cfg, _NoCalls(), 1) == {}


@pytest.mark.slow
def test_children_are_probed_by_the_policy_and_their_rollouts_counted(tmp_path):
    cfg, system = _system(tmp_path, "creator.child_scoring=probe")
    try:
        nothing = probe_children(cfg, system, 0)  # no child yet: no rollouts
        assert nothing["probed"] == 0 and nothing["probe_rollouts"] == 0
        batch = gather([system.creator.call("next_batch", 0)])[0]
        groups = system.rollout.generate(batch.prompts, cfg.solver.n_responses)
        result = gather([system.reward.call("score", batch.prompts, [[r.text for r in g] for g in groups])])[0]
        gather([system.creator.call("report", 0, result.rewards)])
        queued = gather([system.creator.call("probe_requests")])[0]
        assert queued and gather([system.creator.call("stats")])[0]["buffer"]["size"] == 0

        metrics = probe_children(cfg, system, 1)
        assert metrics["probed"] == len(queued)
        assert metrics["probe_rollouts"] == cfg.creator.probe_responses * len(queued)
        assert metrics["admitted"] + metrics["dropped"] == metrics["probed"]
        stats = gather([system.creator.call("stats")])
        creator, buffer = stats[0]["creator"], stats[0]["buffer"]
        assert buffer["size"] == metrics["admitted"]
        assert creator["rollouts_probe"] == metrics["probe_rollouts"]
        assert creator["rollouts_total"] == len(batch.prompts) * cfg.solver.n_responses + metrics["probe_rollouts"]
        records = gather([system.creator.call("buffer_records")])[0]
        # Every admitted child carries its own measured score, never its parent's prior.
        assert all(r["info_measured"] for r in records)
        assert gather([system.creator.call("probe_requests")])[0] == []
    finally:
        system.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_rollout_budget_ends_the_run_at_the_step_that_spends_it(tmp_path, monkeypatch, overlap):
    """run.total_rollouts counts probe rollouts with the trained ones; the run ends (checkpoint, eval, summary) at
    the step that reaches it, under overlap one step later at most, and resuming a spent run runs nothing."""
    import json

    from launch.driver import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    budget = 150
    cfg = load_config("configs/chain_sum.yaml", [
        f"run.output_dir={tmp_path}", "world.seed_size=24", "world.level_mix=[0, 0.5, 0.5, 0, 0]",
        "world.eval_per_level=0", "creator.batch_size=4", "creator.capacity=32", "solver.n_responses=4",
        "creator.probe_responses=3", "creator.child_scoring=probe", "run.total_steps=40",
        f"run.total_rollouts={budget}", "logging.log_every=1", "logging.eval_every=0", f"run.overlap={overlap}"])
    lines: list[str] = []
    summary = run(cfg, inline=True, echo=lines.append)
    rows = [json.loads(line) for line in (tmp_path.glob("*/metrics.jsonl").__next__()).read_text().splitlines()]
    totals = [row["creator/rollouts_total"] for row in rows if "creator/rollouts_total" in row]
    assert len(totals) == summary.steps_done < cfg.run.total_steps
    crossing = next(i for i, total in enumerate(totals) if total >= budget)
    assert crossing > 0  # the budget spans several steps
    # Synchronous: the crossing step is the last. Overlapped: the batch prepared during it is trained too.
    assert len(totals) - 1 == crossing + (1 if overlap == "on" else 0)
    assert summary.rollouts == totals[-1] and summary.checkpoint["step"] == summary.steps_done
    assert any(f"budget run.total_rollouts={budget} is spent" in line for line in lines)
    assert any(f"{summary.steps_done} steps, {totals[-1]} rollouts" in line for line in lines)

    again: list[str] = []
    resumed = run(cfg, inline=True, echo=again.append, resume=summary.run_dir)
    assert resumed.steps_done == summary.steps_done and resumed.rollouts == summary.rollouts
    assert any("nothing left to run" in line for line in again)
