"""The whole online loop without Ray: the same driver, actors as plain objects."""

import pytest

from eva_ray.config import load_config
from launch.driver import run


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "oaif"])
def test_inline_run_walks_all_phases(algorithm, tmp_path, tiny_cache, monkeypatch, check_run):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"solver.algorithm={algorithm}"])
    summary = run(cfg, inline=True, echo=lambda line: None)
    check_run(summary.run_dir, steps=cfg.run.total_steps)


@pytest.mark.slow
def test_a_starved_run_stops_with_a_clear_error_and_keeps_its_outputs(tmp_path, tiny_cache, monkeypatch):
    import json

    from actors.creator import CreatorStarved

    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Every evolve call times out, so the buffer never fills; once D (40 prompts, 4 a step) is used up after 10
    # steps, bootstrap has nothing to train on.
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "evolve.timeout_s=0.001",
                                            "evolve.max_retries=0", "creator.bootstrap_wait_s=1"])
    with pytest.raises(CreatorStarved, match="D is used up and the buffer is empty"):
        run(cfg, inline=True, echo=lambda line: None)
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["error"].startswith("CreatorStarved") and summary["steps_done"] == 10
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/global_step"] for m in lines] == list(range(1, 11))  # nothing logged was lost
    assert sum(v for k, v in lines[-1].items() if k.startswith("creator/evolve_failed/")) > 0
    assert (run_dir / "buffer.json").is_file() and (run_dir / "policy" / "config.json").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
