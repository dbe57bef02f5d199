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
