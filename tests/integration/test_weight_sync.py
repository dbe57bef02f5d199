"""Weights from a real DeepSpeed learner to real rollout engines (HF, and vLLM where installed) over the channel.

Every test that takes ``backend`` runs with transformers in the main suite and with vLLM in CI's vLLM environment
(``pytest -m vllm``). What is checked is what a user relies on: after a sync the engines generate exactly what the
learner's policy generates, on every worker and node, at the learner's version; a sync is skipped when there is
nothing new; a worker that dies during a sync stops the run with its name, and the run's outputs are still written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from eva_ray.config import load_config
from eva_ray.records import PromptRecord

REPO = Path(__file__).resolve().parents[2]
SOLVER = str(REPO / "eva_ray/worlds/checkpoints/chain_sum_solver")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed here (CI runs these in its vLLM environment)")
VLLM = pytest.param("vllm", marks=[pytest.mark.vllm, needs_vllm])
BACKENDS = ["hf", VLLM]
PROMPTS = [PromptRecord(id=f"q{i}", text=f"{a}+{b}=") for i, (a, b) in enumerate(
    [(1, 2), (15, 27), (340, 8), (99, 99), (7, 600), (12, 12), (503, 49), (8, 0)])]


def greedy(worker, prompts=PROMPTS) -> list[list[int]]:
    return [g[0].response_token_ids for g in worker.generate(prompts, 1, greedy=True)]


def hf_worker(path: str, **kw):
    from actors.rollout import RolloutWorker

    return RolloutWorker(path, backend="hf", max_new_tokens=8, max_prompt_tokens=64, **kw)


def vllm_settings(backend: str) -> dict:
    return {"kv_cache_bytes": 32 << 20} if backend == "vllm" else {}


# ------------------------------------------------------------------------------------------------- engines alone


@pytest.mark.vllm
@needs_vllm
def test_vllm_greedy_output_and_log_probs_equal_hf_on_the_same_checkpoint():
    from actors.rollout import RolloutWorker

    prompts = PROMPTS * 2
    before = set(os.listdir("/dev/shm"))
    engine = RolloutWorker(SOLVER, backend="vllm", max_new_tokens=8, max_prompt_tokens=64, kv_cache_bytes=32 << 20,
                           vllm_multiprocessing=True)
    reference = hf_worker(SOLVER)
    try:
        got, want = engine.generate(prompts, 1, greedy=True), reference.generate(prompts, 1, greedy=True)
        assert [g[0].response_token_ids for g in got] == [g[0].response_token_ids for g in want]
        for a, b in zip(got, want):
            assert a[0].finish_reason == b[0].finish_reason
            assert torch.allclose(torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-4)
    finally:
        engine.close()
    assert set(os.listdir("/dev/shm")) - before == set()  # the engine's processes took their shared memory along


@pytest.mark.vllm
@needs_vllm
def test_an_engine_too_slow_to_shut_down_still_leaves_no_process_and_no_shared_memory():
    """vLLM's shutdown kills an engine core that does not stop in time, before the core unlinks its segments (seen
    on a loaded CI machine); close cleans up after it. Stopping the engine's processes makes that case certain."""
    from actors.engine_reaper import alive
    from actors.rollout import RolloutWorker

    import subprocess

    bystander = subprocess.Popen(["sleep", "120"])  # a child of the owner that is not the engine's (wandb's service)
    before = set(os.listdir("/dev/shm"))
    engine = RolloutWorker(SOLVER, backend="vllm", max_new_tokens=8, max_prompt_tokens=64, kv_cache_bytes=32 << 20,
                           vllm_multiprocessing=True)
    processes = engine._engine._engine_pids
    assert bystander.pid not in processes
    assert processes and set(os.listdir("/dev/shm")) - before
    core = engine._engine.llm.llm_engine.engine_core
    shutdown = core.shutdown

    def frozen_then_shut_down(*args, **kwargs):  # frozen after leaving the channel, so only the shutdown times out
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        return shutdown(*args, **kwargs)

    core.shutdown = frozen_then_shut_down
    engine.close()
    assert [p for p in processes if alive(p)] == []
    assert bystander.poll() is None, "close killed a process that was not the engine's"
    bystander.kill()
    assert set(os.listdir("/dev/shm")) - before == set()


KILLED_OWNER = """
import sys, time
from actors.rollout import RolloutWorker
if __name__ == "__main__":
    RolloutWorker(sys.argv[1], backend="vllm", max_new_tokens=8, max_prompt_tokens=64, kv_cache_bytes=32 << 20,
                  vllm_multiprocessing=True)
    print("READY", flush=True)
    time.sleep(600)
"""


@pytest.mark.vllm
@needs_vllm
def test_an_engine_whose_owner_is_killed_leaves_no_process_and_no_shared_memory(tmp_path):
    import subprocess
    import sys
    import time

    from actors.engine_reaper import alive, descendants

    script = tmp_path / "owner.py"
    script.write_text(KILLED_OWNER)
    before = set(os.listdir("/dev/shm"))
    owner = subprocess.Popen([sys.executable, str(script), SOLVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in owner.stdout:  # vLLM logs to stdout as well
            if line.strip() == "READY":
                break
        assert owner.poll() is None, "the engine's owner exited before it was ready"
        engine = descendants(owner.pid)
        assert engine and set(os.listdir("/dev/shm")) - before  # a multiprocess engine: processes and segments
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(Path(f"/proc/{p}").exists() for p in engine)
                                               or set(os.listdir("/dev/shm")) - before):
            time.sleep(0.5)
        assert [p for p in engine if alive(p)] == [] and set(os.listdir("/dev/shm")) - before == set()
    finally:
        if owner.poll() is None:
            owner.kill()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.8)])
def test_behaviour_log_probs_are_those_of_the_distribution_sampled(backend, temperature, top_p):
    """Teacher-forcing the sampled tokens through the checkpoint at the same temperature and top-p gives the
    log-probs the engine returned with them."""
    from transformers import AutoModelForCausalLM

    from actors.hf_backend import _top_p_filter
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(SOLVER, backend=backend, temperature=temperature, top_p=top_p, max_new_tokens=8,
                           max_prompt_tokens=64, seed=3, **vllm_settings(backend))
    model = AutoModelForCausalLM.from_pretrained(SOLVER).eval()
    try:
        groups = worker.generate(PROMPTS, 3)
    finally:
        worker.close()
    checked = 0
    for rollout in [r for g in groups for r in g]:
        ids = torch.tensor([rollout.prompt_token_ids + rollout.response_token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(rollout.prompt_token_ids) - 1:-1] / temperature
        want = torch.log_softmax(_top_p_filter(logits, top_p), -1)
        want = want.gather(1, torch.tensor(rollout.response_token_ids)[:, None]).squeeze(1)
        got = torch.tensor(rollout.logprobs)
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=2e-4), (got, want)
        checked += len(got)
    assert checked >= 24


# ----------------------------------------------------------------------------------------- learner to engines


def start(cfg, tmp_path, *, inline: bool):
    from launch.cluster import start_system
    from launch.driver import load_prompts, with_resolved_models, with_world_defaults

    cfg = with_world_defaults(with_resolved_models(cfg))
    train, _, _ = load_prompts(cfg)
    return cfg, start_system(cfg, train, tmp_path, inline=inline, echo=lambda line: None)


def train_steps(cfg, system, steps: int) -> None:
    from launch.driver import RunSummary, one_step

    summary = RunSummary(run_dir="")
    for step in range(steps):
        one_step(cfg, system, step, summary)


def assert_engines_hold_the_learners_policy(system, tmp_path: Path, start_answers: list[list[int]]) -> None:
    from launch.handles import gather

    version = system.learner_version
    assert version > 0 and system.synced_version == version
    assert [s["policy_version"] for s in gather([w.call("stats") for w in system.rollout.workers])] == \
        [version] * len(system.rollout.workers)
    gather([system.learner.call("save", str(tmp_path / "policy"))])
    want = greedy(hf_worker(str(tmp_path / "policy")))
    assert want != start_answers  # the learner really moved the policy, so equality below means something
    for worker in system.rollout.workers:
        groups = gather([worker.call("generate", PROMPTS, 1, greedy=True)])[0]
        assert [g[0].response_token_ids for g in groups] == want, worker.name


def solver_config(tmp_path, backend: str, *extra: str):
    """The chain_sum world for a few steps at a learning rate that visibly moves the greedy answers.

    Every step applies an update (``skip_zero_advantage`` off), so every step syncs."""
    overrides = [f"run.output_dir={tmp_path}", f"rollout.backend={backend}", "learner.lr=3e-3",
                 "solver.skip_zero_advantage=false",
                 "learner.warmup_ratio=0", "run.total_steps=6", "creator.batch_size=8", "world.eval_per_level=0",
                 "evolve.method=curriculum", "learner.sync_bucket_mb=0.05", "rollout.max_new_tokens=8",
                 "logging.progress=false", *extra]
    if backend == "vllm":
        overrides.append("rollout.kv_cache_bytes=33554432")
    return load_config(str(REPO / "configs/chain_sum.yaml"), overrides)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_inline_sync_streams_the_learners_policy_into_the_engine(tmp_path, backend):
    cfg, system = start(solver_config(tmp_path, backend), tmp_path, inline=True)
    try:
        start_answers = greedy(hf_worker(SOLVER))
        train_steps(cfg, system, 4)
        assert_engines_hold_the_learners_policy(system, tmp_path, start_answers)
    finally:
        system.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_on_two_ray_nodes_hold_the_learners_policy_after_each_sync(tmp_path, backend, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    system = None
    try:
        ray.init(address=cluster.address)
        cfg = solver_config(tmp_path, backend, "resources.rollout.num_workers=2", "resources.placement=STRICT_SPREAD",
                            "resources.rollout.num_cpus=0.5", "resources.learner.num_cpus=0.5")
        cfg, system = start(cfg, tmp_path, inline=False)
        assert len(set(system.rollout_nodes)) == 2
        start_answers = greedy(hf_worker(SOLVER))
        train_steps(cfg, system, 4)
        assert_engines_hold_the_learners_policy(system, tmp_path, start_answers)
    finally:
        if system is not None:
            system.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_steps_without_an_update_do_not_resync(tmp_path):
    from launch.driver import run

    summary = run(solver_config(tmp_path, "hf", "learner.lr=1e-5", "run.total_steps=12",
                                "solver.skip_zero_advantage=true"), inline=True,
                  echo=lambda line: None)
    lines = [json.loads(x) for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "train/updates" in m]
    assert len(steps) == 12
    updated = [m["train/updates"] > 0 for m in steps]
    assert any(updated) and not all(updated)  # chain_sum batches without reward spread are skipped
    assert [("timing/sync_s" in m) for m in steps] == updated
    assert all(m["perf/sync_bytes"] > 0 for m, u in zip(steps, updated) if u)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_killed_during_a_sync_is_restarted_rejoins_the_channel_and_the_run_completes(tmp_path, backend,
                                                                                               monkeypatch):
    import ray

    from launch.cluster import System
    from launch.driver import run

    real_sync = System.sync_weights
    calls = []

    def sync_after_killing_worker_1(self, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second sync: the first one proved the channel works
            victim = self.rollout.workers[1].handle
            os.kill(ray.get(victim.__ray_call__.remote(lambda actor: os.getpid())), signal.SIGKILL)
        return real_sync(self, **kwargs)

    monkeypatch.setattr(System, "sync_weights", sync_after_killing_worker_1)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    before = set(os.listdir("/dev/shm"))
    cfg = solver_config(tmp_path, backend, "resources.rollout.num_workers=2", "learner.lr=3e-2",
                        "run.total_steps=6", "resources.rollout.num_cpus=0.5", "resources.learner.num_cpus=0.5")
    lines: list[str] = []
    summary = run(cfg, echo=lines.append)
    assert summary.steps_done == 6 and summary.error is None and summary.restarts == {"rollout": 1}
    assert any("rollout-1 died during weight sync" in line for line in lines), lines
    assert summary.final["learner_version"] == 6
    run_dir = Path(summary.run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/restarts"] for r in rows if "train/skipped" in r] == [0, 1, 1, 1, 1, 1]
    # Every rollout after the restart came from the learner's latest policy: the restarted worker was resynced.
    assert summary.max_staleness_seen <= 1
    assert (run_dir / "policy" / "config.json").is_file() and (run_dir / "buffer.json").is_file()
    assert set(os.listdir("/dev/shm")) - before == set()
