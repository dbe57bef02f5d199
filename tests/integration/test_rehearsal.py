"""The 8xH100 run rehearsed on CPU: two simulated Ray nodes of 4 logical GPUs, the paper config's topology, tiny models.

Same actor counts, groups, bundles and placement strategies as ``configs/gemma2-9b-rloo-8xh100.yaml`` (2 ZeRO-3
learner ranks, the reward model, 5 rollout engines, the creator); what changes is only what cannot run here: tiny
models instead of gemma/ArmoRM, the HF backend instead of vLLM, float32, a local LLM as the evolve model, and no
optimizer offload (DeepSpeed's CPU Adam would compile for a minute). The run's summary records where every actor
landed; it must be what ``eva-ray plan --nodes 2 --gpus-per-node 4`` printed for the same config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eva_ray.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/gemma2-9b-rloo-8xh100.yaml"
CPU_STANDINS = [
    "model.path=tiny:policy", "model.dtype=float32", "reward.model=tiny:reward", "reward.max_length=512",
    "rollout.backend=hf", "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=256",
    "evolve.model=local/tiny", "evolve.local_model_path=tiny:policy", "evolve.api_key_env=null",
    "evolve.max_tokens=32", "data.path=configs/data/tiny_prompts.jsonl", "data.id_field=id", "data.eval_size=8",
    "creator.capacity=16", "run.total_steps=3", "learner.offload_optimizer=false", "learner.micro_batch_size=12",
    "logging.wandb_mode=offline", "logging.eval_every=0", "logging.progress=false",
]


def test_the_8xh100_topology_lands_where_the_plan_says(tmp_path, tiny_cache, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from launch.driver import run
    from launch.plan import Target, make_plan

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = [*CPU_STANDINS, f"run.output_dir={tmp_path}"]
    cfg = load_config(ROOT / CONFIG, overrides)

    printed = subprocess.run([sys.executable, "-m", "launch", "plan", "--config", CONFIG, *overrides, "--nodes", "2",
                              "--gpus-per-node", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert printed.returncode == 0, printed.stderr
    plan = make_plan(cfg, Target(2, 4, cfg.cluster.gpu_memory_gb))
    for p in plan.placements:  # the plan as data is the plan as printed
        if p.node is not None:
            assert f"{p.name:<12} node {p.node}, GPU" in printed.stdout, p.name
    learners = [p for p in plan.placements if p.role == "learner"]
    engine_nodes = {p.node for p in plan.placements if p.role == "rollout"}
    assert len(learners) >= 2 and len(engine_nodes) >= 2

    # 12 logical CPUs a node: the config's bundles (4 per learner rank, 2 per engine) must fit as they are.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 12, "num_gpus": 4,
                                                            "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=12, num_gpus=4, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address)
        summary = run(cfg, echo=lambda line: None)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.error is None and summary.steps_done == 3
    landed = {row["actor"]: row for row in summary.final["placement"]}
    planned = {p.name: p for p in plan.placements}
    assert landed.keys() == planned.keys()
    # The plan's node k is one real node, and different planned nodes are different real nodes.
    real_of_planned: dict[int, set[str]] = {}
    for name, p in planned.items():
        assert landed[name]["plan_node"] == p.node and landed[name]["gpus"] == list(p.gpus)
        if p.node is not None:
            real_of_planned.setdefault(p.node, set()).add(landed[name]["node_id"])
    assert all(len(ids) == 1 for ids in real_of_planned.values()), real_of_planned
    assert len({next(iter(ids)) for ids in real_of_planned.values()}) == len(real_of_planned) == 2
