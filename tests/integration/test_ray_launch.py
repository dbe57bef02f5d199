"""The run on Ray, started the way users start it: `ray start`, `ray job submit`, and a two-node cluster."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(tmp_path: Path, tiny_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        # Without this, `ray start --node-ip-address=127.0.0.1` still binds the machine's outside address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{BIN}:{env.get('PATH', '')}",  # the job's `python` must be this environment's
        "EVA_RAY_CACHE": str(tiny_cache),
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        # Ray 2.60's job API takes a token: keep that auth on, and let the CLI read ~/.ray/auth_token.
        "RAY_AUTH_MODE": "token",
    })
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def ray_head(env: dict[str, str]):
    """A one-node cluster started with `ray start --head`, as a user starts one; yields the job API's address."""
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray-eva-{os.getpid()}"  # short: Ray's socket paths must stay under 107 chars
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=4",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=180)
    try:
        yield f"--address=http://127.0.0.1:{dash_port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(env: dict[str, str], address: str, job_id: str, args: list[str]) -> tuple[str, str]:
    """`ray job submit` of `python -m launch <args>` from this repository; waits for it: (status, logs)."""
    submit = [str(BIN / "ray"), "job", "submit", address, "--submission-id", job_id, "--no-wait",
              "--working-dir", str(REPO),
              "--runtime-env-json", '{"excludes": ["runs/", "wandb/", ".git/", "docs/"]}',
              "--", "python", "-m", "launch", *args]
    # The job server starts after `ray start` returns and, on a loaded machine, can take a while to answer:
    # submit again until it takes the job (the submission id makes a repeat safe), showing why it refused.
    deadline = time.monotonic() + 120
    while True:
        sent = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
        if sent.returncode == 0 or "already exists" in sent.stdout + sent.stderr:
            break
        assert time.monotonic() < deadline, f"ray job submit kept failing:\n{sent.stdout}\n{sent.stderr}"
        time.sleep(3)
    status, deadline = "", time.monotonic() + 900
    while time.monotonic() < deadline:
        done = subprocess.run([str(BIN / "ray"), "job", "status", address, job_id], env=env,
                              capture_output=True, text=True, timeout=60)
        status = done.stdout + done.stderr  # the CLI logs its verdict to stderr: "Job '<id>' succeeded"
        if any(f"Job '{job_id}' {word}" in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    return status, logs


@pytest.mark.slow
def test_ray_job_submit_runs_online_eva_end_to_end_with_two_learner_ranks(tmp_path, tiny_cache, check_run):
    env = ray_env(tmp_path, tiny_cache)
    with ray_head(env) as address:
        out_dir = tmp_path / "runs"
        job_id = f"eva-test-{os.getpid()}"
        status, logs = submit_job(env, address, job_id, [
            "run", "--config", "configs/tiny.yaml", f"run.output_dir={out_dir}", "resources.learner.num_workers=2",
            "learner.zero_stage=3", "learner.verify_sync=true"])
        assert f"Job '{job_id}' succeeded" in status, status + logs[-4000:]
        assert "joined the Ray cluster" in logs and "step 20/20" in logs
        (run_dir,) = out_dir.iterdir()
        run = check_run(run_dir, steps=20)
        # Two ZeRO-3 learner ranks; after every sync each worker's weights were checked against the learner's.
        placed = [p["actor"] for p in run["summary"]["final"]["placement"]]
        assert {"learner-0", "learner-1"} <= set(placed)
        synced = [m for m in run["metrics"] if "perf/sync_bytes" in m]
        assert synced and all(m["perf/sync_verified"] == 1.0 for m in synced)


OFFLINE_JOBS = {
    # The tiny config: a random tiny policy and reward model, the tiny LLM evolving through LiteLLM.
    "tiny": ["--config", "configs/tiny.yaml", "run.mode=offline", "solver.algorithm=dpo", "offline.iterations=2",
             "offline.prompts_per_iteration=12", "offline.responses_per_prompt=4", "offline.shard_prompts=6",
             "offline.lr=1e-3"],
    # The cipher world, its curriculum evolver and its verifier; two learner ranks (each iteration's reset, the
    # checkpoints and the pair batches go to both).
    "cipher": ["--config", "configs/cipher-offline.yaml", "offline.iterations=2", "offline.prompts_per_iteration=64",
               "offline.shard_prompts=32", "world.eval_per_level=10", "resources.learner.num_workers=2"],
}


@pytest.mark.slow
def test_ray_job_submit_runs_offline_eva_with_two_rollout_workers(tmp_path, tiny_cache):
    env = ray_env(tmp_path, tiny_cache)
    with ray_head(env) as address:
        for name, args in OFFLINE_JOBS.items():
            out_dir = tmp_path / name
            job_id = f"eva-offline-{name}-{os.getpid()}"
            status, logs = submit_job(env, address, job_id, [
                "run", *args, f"run.output_dir={out_dir}", "resources.rollout.num_workers=2"])
            assert f"Job '{job_id}' succeeded" in status, status + logs[-4000:]
            assert "joined the Ray cluster" in logs and "iteration 2 done" in logs
            (run_dir,) = out_dir.iterdir()
            summary = json.loads((run_dir / "summary.json").read_text())
            assert [i["iteration"] for i in summary["iterations"]] == [1, 2], name
            assert summary["iterations"][1]["made"]["how"] == "evolved" and summary["iterations"][1]["updates"] > 0
            for t in (1, 2):
                folder = run_dir / "offline" / f"iter-{t:03d}"
                assert (folder / "pairs.parquet").is_file() and (folder / "policy" / "config.json").is_file()
                assert sorted(p.name for p in (folder / "responses").iterdir()) == [
                    f"shard-{i:05d}.parquet" for i in range(2)]
            # Both rollout workers generated: each shard was split over them.
            workers = summary["workers"]
            assert set(workers) == {"rollout-0", "rollout-1"} and all(w["responses"] > 0 for w in workers.values())
            assert {"rollout-0", "rollout-1"} <= {p["actor"] for p in summary["placement"]}


@pytest.mark.slow
def test_rollout_workers_spread_over_two_nodes(tmp_path, tiny_cache, monkeypatch, check_run):
    import ray
    from ray.cluster_utils import Cluster

    from eva_ray.config import load_config
    from launch.driver import run

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address)
        cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "resources.rollout.num_workers=2",
                                                "resources.placement=STRICT_SPREAD", "solver.algorithm=oaif"])
        summary = run(cfg, echo=lambda line: None)
        run_out = check_run(summary.run_dir, steps=cfg.run.total_steps)
        nodes = run_out["summary"]["final"]["rollout_nodes"]
        assert len(nodes) == 2 and len(set(nodes)) == 2
        assert set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
