"""Checkpoints and ``--resume`` with real processes: the driver killed with SIGKILL mid-run and resumed trains the
very prompts, step by step, that the same run never interrupted trains (none lost, none trained twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eva_ray.lineage import read_lineage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 10, 4
# The chain_sum world, small: D runs out after 5 steps, so warm-up, mix-up and bootstrap all happen in 10 steps.
OVERRIDES = [f"run.total_steps={STEPS}", f"learner.checkpoint_every={EVERY}", "world.seed_size=40",
             "world.eval_per_level=2", "logging.eval_every=5", "creator.capacity=24", "creator.snapshot_every=3",
             "logging.wandb_mode=offline", "logging.progress=false", "creator.bootstrap_wait_s=5"]


def launch(*args: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("RAY_ADDRESS", None)
    # wandb records its service in WANDB_SERVICE once this pytest process has used it; a child that inherits it
    # shares that service, which would still count the killed driver's run as live ("run ID ... is in use").
    env.pop("WANDB_SERVICE", None)
    return subprocess.Popen([sys.executable, "-m", "launch", "run", *args], cwd=REPO, env=env,
                            stdout=open(out, "w"), stderr=subprocess.STDOUT)


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "train/skipped" in row:  # a step's line (not the step-0 evaluation, not a table)
            rows.append(row["train/global_step"])
    return rows


def trained(run_dir: Path) -> list[tuple[int, str]]:
    return [(e["step"], e["id"]) for e in read_lineage(run_dir / "lineage.jsonl") if e["event"] == "trained"]


def wait(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not end; its output:\n{log.read_text()[-3000:]}")


def test_a_driver_killed_mid_run_resumes_and_trains_exactly_what_the_uninterrupted_run_trains(tmp_path):
    whole = tmp_path / "whole"
    log = tmp_path / "whole.log"
    assert wait(launch("--inline", "--config", "configs/chain_sum.yaml", f"run.output_dir={whole}", *OVERRIDES,
                       out=log), log) == 0, log.read_text()
    (reference,) = whole.glob("chain-sum-*")

    cut = tmp_path / "cut"
    log = tmp_path / "cut.log"
    proc = launch("--inline", "--config", "configs/chain_sum.yaml", f"run.output_dir={cut}", *OVERRIDES, out=log)
    deadline = time.monotonic() + 600
    while True:  # kill -9 once step 6 is logged: past the checkpoint of step 4, before the next one
        runs = list(cut.glob("chain-sum-*"))
        if runs and max(steps_logged(runs[0]), default=0) >= EVERY + 2:
            break
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 6"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = runs
    killed_at = max(steps_logged(run_dir))
    assert not (run_dir / "summary.json").exists()  # no clean end: the process died at once
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints and checkpoints[-1] == f"step-{EVERY:08d}" and killed_at > EVERY, (checkpoints, killed_at)

    log = tmp_path / "resume.log"
    assert wait(launch("--inline", "--resume", str(run_dir), out=log), log) == 0, log.read_text()
    assert f"resuming {run_dir} from its checkpoint at step {EVERY}" in log.read_text()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == STEPS and summary["error"] is None and summary["resumed_from"] == [EVERY]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))  # every step once, killed steps included
    want = trained(reference)
    assert {s for s, _ in want} == set(range(STEPS))
    assert trained(run_dir) == want  # the same prompt ids at every step, in the same order
    assert summary["phases"] == json.loads((reference / "summary.json").read_text())["phases"]
    assert len(set(summary["phases"])) == 3  # warm-up, mix-up and bootstrap: the creator's state carried over
    # The policy ends where the uninterrupted run's does.
    assert summary["final"]["weight_change"] == json.loads((reference / "summary.json").read_text())[
        "final"]["weight_change"]
    # wandb continued the same run id.
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids
