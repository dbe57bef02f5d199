"""Tensor-parallel vLLM engines placed the way vLLM 0.32 expects, in the plan and on a simulated Ray cluster.

vLLM's Ray executor starts one worker per tensor-parallel rank, each asking for one GPU on its own bundle of the
placement group the engine runs in (``VLLM_RAY_BUNDLE_INDICES``); its RL examples put the engine actor itself on
bundle 0 with no GPU. The plan says the same (``actor_gpus`` 0, one one-GPU bundle per rank), the launcher reads
it from the plan, and on logical GPUs the workers then all find their GPU, where an actor holding bundle 0's GPU
leaves worker 0 unschedulable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from eva_ray.config import load_config
from launch.cluster import engine_env, engine_kwargs
from launch.plan import Target, format_plan, make_plan

ROOT = Path(__file__).resolve().parents[2]
RLOO = ROOT / "configs" / "gemma2-9b-rloo-8xh100.yaml"
TP2 = ["resources.learner.num_workers=2", "learner.offload_optimizer=true", "rollout.tensor_parallel_size=2",
       "resources.rollout.num_workers=2"]


def test_a_tp_engine_on_the_ray_executor_holds_no_gpu_and_gets_one_bundle_per_rank():
    cfg = load_config(RLOO, TP2)
    plan = make_plan(cfg, Target(1, 8, 80))
    engine = plan.placement("rollout", 1)
    group = {g.name: g for g in plan.groups}["rollout-1"]
    assert engine.actor_gpus == 0 and len(engine.gpus) == 2 and engine.bundle_indices == (0, 1)
    assert [b.get("GPU") for b in group.bundles] == [1.0, 1.0] and group.strategy == "STRICT_PACK"
    assert group.bundles[0]["CPU"] == cfg.resources.rollout.num_cpus and "CPU" not in group.bundles[1]
    assert plan.placement("learner", 0).actor_gpus == 1 and plan.placement("reward").actor_gpus == 1
    assert engine_env(cfg, plan, 1) == {"VLLM_RAY_BUNDLE_INDICES": "0,1"}
    assert engine_kwargs(cfg, plan, {})["distributed_executor_backend"] == "ray"
    assert "vLLM's Ray workers hold the GPUs" in format_plan(plan)
    assert plan.to_dict()["placements"][-2]["actor_gpus"] == 0.0


def test_a_tp_engine_on_the_mp_executor_holds_all_its_gpus_in_one_bundle():
    cfg = load_config(RLOO, [*TP2, "rollout.tensor_parallel_executor=mp"])
    plan = make_plan(cfg, Target(1, 8, 80))
    engine = plan.placement("rollout", 0)
    assert engine.actor_gpus == 2 and engine.bundle_indices == (0,)
    assert [b["GPU"] for b in {g.name: g for g in plan.groups}["rollout-0"].bundles] == [2.0]
    assert engine_env(cfg, plan, 0) == {} and engine_kwargs(cfg, plan, {})["distributed_executor_backend"] == "mp"


def test_single_gpu_engines_are_unchanged():
    cfg = load_config(RLOO, ["resources.learner.num_workers=2", "learner.offload_optimizer=true"])
    plan = make_plan(cfg, Target(1, 8, 80))
    assert all(p.actor_gpus == 1 for p in plan.placements if p.role == "rollout")
    assert engine_env(cfg, plan, 0) == {} and "distributed_executor_backend" not in engine_kwargs(cfg, plan, {})


@pytest.mark.slow
def test_on_logical_gpus_every_tp_worker_finds_its_gpu_only_when_the_actor_holds_none():
    """What vLLM's Ray executor does inside the engine actor, with logical GPUs: one task per rank on its bundle."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from launch.placement import realize

    cfg = load_config(RLOO, ["rollout.tensor_parallel_size=2", "resources.rollout.num_workers=1",
                             "resources.learner.num_workers=1",
                             "resources.rollout.num_cpus=1", "resources.learner.num_cpus=1",
                             "resources.reward.num_cpus=1"])
    plan = make_plan(cfg, Target(1, 4, 80))
    engine = plan.placement("rollout", 0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 4,
                                                            "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        placed = realize(plan, echo=lambda line: None)
        group = placed.groups[engine.group]

        @ray.remote(num_cpus=0)
        def rank_worker() -> list:
            return ray.get_gpu_ids()

        @ray.remote
        class Engine:
            def start_workers(self, wait_s: float) -> list | None:
                refs = [rank_worker.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=b)).remote() for b in engine.bundle_indices]
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
                if len(ready) < len(refs):
                    for ref in refs:
                        ray.cancel(ref, force=True)
                    return None
                return ray.get(refs)

        def engine_holding(gpus: float):
            return Engine.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=placed.strategy("rollout", 0)
                                  ).remote()

        planned = engine_holding(engine.actor_gpus)
        got = ray.get(planned.start_workers.remote(60.0))
        assert got is not None and len({tuple(ids) for ids in got}) == 2  # two workers, two distinct GPUs
        ray.kill(planned)
        # The layout before: the actor itself holds a GPU of bundle 0, so worker 0 never finds one.
        old = engine_holding(1)
        assert ray.get(old.start_workers.remote(8.0)) is None
        placed.remove()
    finally:
        ray.shutdown()
        cluster.shutdown()
