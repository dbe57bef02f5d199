"""Shared checks on what a finished run left in its run directory (its own outputs, not the driver's memory)."""

import json
import os
from pathlib import Path

# Ray reads this when it is imported: without it, nodes started on 127.0.0.1 bind the outside address too and a
# driver connecting on the loopback address hangs. Set before any test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest

from eva_ray.lineage import read_lineage

NAMESPACES = ("train/", "rollout/", "buffer/", "creator/", "eval/", "timing/")


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tables = [line for line in lines if "creator/evolved_prompts" in line]
    # Logged every creator.snapshot_every steps and at the end: the last is the run's final table.
    table = tables[-1]["creator/evolved_prompts"]
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "metrics": [line for line in lines if "creator/evolved_prompts" not in line],
        "evolved": [dict(zip(table["columns"], row)) for row in table["rows"]],
        "buffer": json.loads((run_dir / "buffer.json").read_text()),
    }


def assert_complete_run(run_dir: str | Path, *, steps: int, max_staleness: int = 1) -> dict:
    """Everything issue 3 asks a finished tiny run to show."""
    run = read_run(run_dir)
    summary = run["summary"]
    assert summary["steps_done"] == steps and summary["error"] is None
    phases = summary["phases"]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == ["warm-up", "mix-up", "bootstrap"], phases
    generations = {row["generation"] for row in run["evolved"]}
    assert {1, 2} <= generations, generations
    final = summary["final"]
    assert final["provider"]["completed"] > 0  # evolve calls went through LiteLLM to the local provider
    assert final["creator"]["llm_calls"] == final["provider"]["completed"]
    assert final["weight_change"] > 0  # the learner moved the policy away from its start
    assert summary["max_staleness_seen"] <= max_staleness
    keys = set().union(*(m.keys() for m in run["metrics"]))
    for ns in NAMESPACES:
        assert any(k.startswith(ns) for k in keys), f"no {ns} metric"
    assert all("train/global_step" in m for m in run["metrics"])
    assert [m["train/global_step"] for m in run["metrics"]] == list(range(1, steps + 1))
    # The lineage log saw every step's minibatch and every evolved prompt that was trained on.
    lineage = read_lineage(Path(run_dir) / "lineage.jsonl")
    trained = [e for e in lineage if e["event"] == "trained"]
    assert sorted({e["step"] for e in trained}) == list(range(steps))
    added = {e["record"]["id"] for e in lineage if e["event"] == "added"}
    assert {e["id"] for e in trained if e["source"] == "evolved"} <= added
    wandb_files = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 0
    return run


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One cache of tiny:policy / tiny:reward for the session (EVA_RAY_CACHE)."""
    return tmp_path_factory.mktemp("eva-cache")


@pytest.fixture
def check_run():
    """``check_run(run_dir, steps=...)``: assert a finished run is complete; returns its outputs."""
    return assert_complete_run
