"""A resumed run whose wandb id is still held (the killed run's wandb service lives on) logs to a new wandb run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from launch.metrics import MetricsLogger
logger = MetricsLogger(sys.argv[1], project="p", run_name="r", config={}, mode_setting="offline",
                       resume_id=sys.argv[2], resume_step=0)
logger.log(1, {"train": {"loss": 1.0}})
print("ID", logger.run_id)
print("NOTE", logger.resume_refused)
logger.close()
"""


@pytest.mark.slow
def test_a_held_wandb_id_falls_back_to_a_new_run(tmp_path):
    import wandb

    # This process holds run "held-1" in its wandb service; the child finds the service through WANDB_SERVICE, as a
    # driver started by a process that already uses wandb does.
    run = wandb.init(project="p", id="held-1", dir=str(tmp_path), mode="offline", settings=wandb.Settings(quiet=True))
    try:
        assert os.environ.get("WANDB_SERVICE")
        child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"), "held-1"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                               timeout=300)
    finally:
        run.finish()
    assert child.returncode == 0, child.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in child.stdout.splitlines() if line.split(" ")[0] in ("ID", "NOTE"))
    assert lines["ID"] != "held-1" and "held-1 is still held" in lines["NOTE"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("train/loss") == 1
