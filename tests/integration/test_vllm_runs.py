"""Whole runs with ``rollout.backend=vllm`` on a real local Ray instance: the tiny config and the default run.

They need vLLM (CI's vLLM environment runs them with ``pytest -m vllm``); elsewhere they are skipped.
"""

import importlib.util
import json
import os

import pytest

from launch.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")]


@pytest.fixture
def run_env(tiny_cache, monkeypatch):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    before = set(os.listdir("/dev/shm"))
    yield
    assert set(os.listdir("/dev/shm")) - before == set()  # no engine left shared memory behind


def test_the_tiny_config_runs_end_to_end_on_vllm(tmp_path, run_env, check_run):
    code = main(["run", "--config", "configs/tiny.yaml", f"run.output_dir={tmp_path}", "rollout.backend=vllm",
                 "logging.progress=false"])
    assert code == 0
    (run_dir,) = tmp_path.glob("tiny-*")
    run = check_run(run_dir, steps=20)
    synced = [m for m in run["metrics"] if "perf/sync_bytes" in m]
    assert synced and all(m["perf/sync_bytes"] > 0 for m in synced)
    assert max(m["rollout/policy_version_min"] for m in run["metrics"]) > 0  # vLLM sampled synced weights


def test_the_default_run_completes_on_vllm(tmp_path, run_env):
    code = main(["run", "--config", "configs/chain_sum.yaml", f"run.output_dir={tmp_path}", "rollout.backend=vllm",
                 "rollout.kv_cache_bytes=33554432", "run.total_steps=30", "world.seed_size=120", "world.eval_per_level=20", "creator.capacity=48",
                 "logging.eval_every=15", "logging.progress=false"])
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 30 and summary["error"] is None
    # The shipped solver greedy-decoded by vLLM: level 1 always solved, level 5 never, as with transformers.
    assert summary["eval_start"]["accuracy_level_1"] >= 0.9 and summary["eval_start"]["accuracy_level_5"] == 0.0
    assert set(summary["eval"]) >= {"accuracy", "win_rate"}


def test_offline_eva_runs_two_iterations_on_vllm(tmp_path, run_env):
    """Offline eva on Ray with vLLM engines: each iteration's responses come from the weights the last one trained."""
    code = main(["run", "--config", "configs/cipher-offline.yaml", f"run.output_dir={tmp_path}",
                 "rollout.backend=vllm", "rollout.kv_cache_bytes=33554432", "offline.iterations=2",
                 "offline.prompts_per_iteration=128", "offline.shard_prompts=64", "world.eval_per_level=10",
                 "logging.progress=false"])
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["iterations"]
    assert first["updates"] > 0 and second["made"]["how"] == "evolved"
    import pyarrow.parquet as pq

    versions = set(pq.read_table(run_dir / "offline" / "iter-002" / "responses").column("policy_version").to_pylist())
    assert versions == {first["updates"]}  # sampled by the policy iteration 1 ended with, synced to the engine
