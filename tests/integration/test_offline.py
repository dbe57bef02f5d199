"""Offline eva end to end (inline, in the cipher world): the iterations, their datasets, and resume after a kill -9.

A kill is a real SIGKILL of the run's process at a chosen point (a small wrapper kills its own process there); the
run is then resumed with ``eva-ray run --resume`` and must end with exactly the policy an uninterrupted run ends
with, having kept the shards it had and repeated no optimizer update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOSS = "dpo"
ARGS = ["run", "--inline", "--config", "configs/cipher-offline.yaml", "offline.iterations=2",
        "offline.prompts_per_iteration=64", "offline.shard_prompts=32", "offline.batch_size=4",
        "offline.checkpoint_every=2", "world.eval_per_level=10", f"solver.algorithm={LOSS}", "logging.progress=false"]

# Runs the CLI; with a kill point, SIGKILLs its own process there (after shard 0 of iteration 2's responses is on
# disk, or on the first update of iteration 2 after its first checkpoint: an update no checkpoint holds), or sends
# itself SIGTERM at that update ("sigterm": the run should checkpoint it and stop).
KILLER = """
import json, os, signal, sys
from pathlib import Path
point, out = sys.argv[1], Path(sys.argv[2])
if point == "generation":
    from eva_ray.offline.store import IterationStore
    write = IterationStore.write_shard
    def write_shard(self, kind, index, groups, rewards):
        write(self, kind, index, groups, rewards)
        if self.iteration == 2 and kind == "responses" and index == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    IterationStore.write_shard = write_shard
elif point in ("training", "sigterm"):
    from actors.learner import Learner
    step = Learner.train_step
    def train_step(self, batch, **kw):
        result = step(self, batch, **kw)
        states = list(out.glob("*/offline/iter-002/train_state.json"))
        if states and json.loads(states[0].read_text())["updates"] > 0:
            os.kill(os.getpid(), signal.SIGKILL if point == "training" else signal.SIGTERM)
        return result
    Learner.train_step = train_step
from launch.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_cli(out: Path, *extra: str, point: str = "none") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLER, point, str(out), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def run_dir_in(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "offline" / "iter-002" / "policy" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    done = run_cli(out, *ARGS, f"run.output_dir={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir_in(out)


@pytest.mark.slow
def test_two_iterations_write_their_datasets_and_evolve_the_second_set(uninterrupted):
    import datasets

    run_dir = uninterrupted
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    first, second = summary["iterations"]
    assert first["made"]["how"] == "seed" and second["made"]["how"] == "evolved"
    assert second["made"]["evolved"] > 0 and second["made"]["evolved"] + second["made"]["kept"] == 64
    # Equal cost is counted: two response passes in iteration 1's set (training, then informativeness) and one
    # for iteration 2's set, 6 responses per prompt.
    assert summary["responses"] == 3 * 64 * 6
    for it in summary["iterations"]:
        assert it["updates"] == 2 * -(-it["pairs"] // 4) and it["pairs"] > 0  # 2 epochs of batches of 4 pairs
        assert "accuracy_level_1" in it["eval"]
    it2 = run_dir / "offline" / "iter-002"
    prompts = datasets.load_dataset("parquet", data_files=str(it2 / "prompts.parquet"), split="train")
    evolved = [row for row in prompts if row["source"] == "evolved"]
    assert len(evolved) == second["made"]["evolved"]
    assert all(row["parent_id"] and row["operator"] for row in evolved)
    parents = {row["id"] for row in datasets.load_dataset(
        "parquet", data_files=str(run_dir / "offline" / "iter-001" / "prompts.parquet"), split="train")}
    assert {row["parent_id"] for row in evolved} <= parents  # children of iteration 1's set
    pairs = datasets.load_dataset("parquet", data_files=str(it2 / "pairs.parquet"), split="train")
    assert pairs.num_rows == second["pairs"]
    assert all(row["chosen_reward"] > row["rejected_reward"] for row in pairs)
    responses = datasets.load_dataset("parquet", data_files=str(it2 / "responses" / "*.parquet"), split="train")
    assert responses.num_rows == 64 * 6 and set(responses["prompt_id"]) == {row["id"] for row in prompts}
    # Only the newest learner checkpoint is kept (a 9B one is ~111 GB); every iteration keeps its policy.
    assert not (run_dir / "offline" / "iter-001" / "train-checkpoint").exists()
    assert (it2 / "train-checkpoint").is_dir() and (run_dir / "offline" / "iter-001" / "policy").is_dir()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in line for line in lines) and any("offline/pairs" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["generation", "training", "sigterm"])
def test_a_kill_resumes_to_the_uninterrupted_policy_keeping_finished_work(uninterrupted, tmp_path, point):
    killed = run_cli(tmp_path, *ARGS, f"run.output_dir={tmp_path}", point=point)
    assert killed.returncode == (143 if point == "sigterm" else -9), killed.stdout[-3000:] + killed.stderr[-3000:]
    run_dir = run_dir_in(tmp_path)
    it2 = run_dir / "offline" / "iter-002"
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in it2.rglob("*.parquet")}
    assert kept and not (it2 / "done.json").exists()
    if point != "generation":
        before = json.loads((it2 / "train_state.json").read_text())["updates"]
    if point == "sigterm":  # stopped after checkpointing the update it was in, and said how to resume
        assert "--resume" in killed.stdout and before > 1
    resumed = run_cli(tmp_path, "run", "--inline", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # Every file the killed run finished is still the same file: nothing was generated or paired again.
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == seen for p, seen in kept.items())
    if point == "generation":
        assert "1 of 2 shards already on disk, kept" in resumed.stdout
    else:
        assert f"training resumes after update {before}" in resumed.stdout
    assert same_weights(final_weights(run_dir), final_weights(uninterrupted))
    whole = json.loads((uninterrupted / "summary.json").read_text())["iterations"]
    again = json.loads((run_dir / "summary.json").read_text())["iterations"]
    assert [i["updates"] for i in again] == [i["updates"] for i in whole]
    assert [i["eval"]["accuracy"] for i in again] == [i["eval"]["accuracy"] for i in whole]


@pytest.mark.slow
def test_resume_refuses_a_changed_config(uninterrupted, tmp_path):
    done = run_cli(tmp_path, "run", "--inline", "--resume", str(uninterrupted), "offline.children=3")
    assert done.returncode == 2 and "offline.children" in done.stderr


@pytest.fixture
def tiny_offline(tmp_path, tiny_cache, monkeypatch):
    """``tiny_offline(*overrides)``: one inline offline iteration of the tiny config; returns its summary."""
    from eva_ray.config import load_config
    from launch.offline import run_offline

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")

    def run(*overrides: str, echo=lambda line: None):
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={tmp_path}", "run.mode=offline",
                                                            "offline.iterations=1", *overrides])
        return cfg, run_offline(cfg, inline=True, echo=echo)

    return run


@pytest.mark.slow
def test_the_rewriter_replaces_chosen_responses_through_litellm(tiny_offline):
    """The tiny config offline, with offline.rewrite: the tiny LLM behind LiteLLM rewrites each chosen response."""
    import datasets

    lines: list[str] = []
    # The tiny LLM writes short noise: bounds wide enough to accept it, so what is checked is the plumbing.
    _, summary = tiny_offline("solver.algorithm=dpo", "offline.prompts_per_iteration=8",
                              "offline.responses_per_prompt=3", "offline.rewrite=true",
                              "offline.rewrite_min_ratio=0.01", "offline.rewrite_max_ratio=100",
                              "offline.rewrite_max_tokens=24", echo=lines.append)
    (it,) = summary.iterations
    pairs = datasets.load_dataset("parquet", data_files=str(Path(summary.run_dir) / "offline" / "iter-001" /
                                                            "pairs.parquet"), split="train")
    rewritten = [row for row in pairs if row["rewritten"]]
    assert it["rewritten"] == len(rewritten) > 0 and it["updates"] > 0
    assert all(row["original_chosen"] and row["chosen"] != row["original_chosen"] for row in rewritten)
    assert any(line.startswith("eva-ray: rewrote ") for line in lines)


@pytest.mark.slow
def test_sppo_targets_come_from_the_pairwise_reward_models_comparisons(tiny_offline):
    """SPPO with a pairwise reward model: each pair's targets are P(y > pi), the mean of the model's P(y > y_j)."""
    import pyarrow.parquet as pq

    from actors.reward import RewardActor
    from eva_ray.offline.store import IterationStore, groups_of
    from eva_ray.tiny import resolve_model_path

    cfg, summary = tiny_offline("solver.algorithm=sppo", "reward.backend=pairwise",
                                "offline.prompts_per_iteration=6", "offline.responses_per_prompt=3",
                                "offline.epochs=1")
    store = IterationStore(summary.run_dir, 1)
    prompts = {p.id: p for p in store.prompts()}
    ids, groups, _ = groups_of(store.read_shards("responses", 1))
    judge = RewardActor("pairwise", model=resolve_model_path("tiny:reward", seed=cfg.run.seed), batch_size=16)
    pairs = pq.read_table(store.pairs_file).to_pylist()
    assert pairs and summary.iterations[0]["updates"] > 0
    for pair in pairs:
        group = groups[ids.index(pair["prompt_id"])]
        texts = [r.text for r in group]
        k = len(texts)
        wins = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            probs = judge.compare([prompts[pair["prompt_id"]]] * len(others), [texts[i]] * len(others),
                                  [texts[j] for j in others])
            wins.append((0.5 + sum(probs)) / k)
        assert pair["chosen_target"] == pytest.approx(wins[texts.index(pair["chosen"])], abs=1e-5)
        assert pair["rejected_target"] == pytest.approx(wins[texts.index(pair["rejected"])], abs=1e-5)


@pytest.mark.slow
def test_a_finished_run_goes_on_for_more_iterations(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)  # the fixture's run stays as it is for the other tests
    fewer = run_cli(tmp_path, "run", "--inline", "--resume", str(run_dir), "offline.iterations=1")
    assert fewer.returncode == 2 and "below the 2 iterations" in fewer.stderr
    more = run_cli(tmp_path, "run", "--inline", "--resume", str(run_dir), "offline.iterations=3")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [i["iteration"] for i in summary["iterations"]] == [1, 2, 3] and summary["run_dir"] == str(run_dir)
    assert summary["iterations"][2]["made"]["how"] == "evolved" and "iteration 3 done" in more.stdout
    assert "iterations: 3" in (run_dir / "config.yaml").read_text()  # the next resume compares with this
