"""Extension points used from outside the project: a plug-in registered by test code alone runs in a real run.

Each test registers its plug-in here (no project file is edited), runs a few inline steps of a tiny run with it,
and removes it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eva_ray.config import load_config
from launch.driver import run

# A few steps of the tiny CPU run (2-layer models, a reward model with spread in every group), prompts from D only:
# what a plug-in changes is the step, not the curriculum.
SHORT_RUN = ["run.total_steps=3", "evolve.method=none", "logging.eval_every=100", "logging.progress=false"]


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------ a loss


def _toy_loss(logprobs, ref_logprobs, mask, rewards, *, beta, calls):
    """REINFORCE against the group's mean reward, without a reference: the smallest loss that learns."""
    calls.append({"rewards": tuple(rewards.shape), "ref": ref_logprobs, "beta": beta})
    advantages = (rewards - rewards.nanmean(dim=1, keepdim=True)).nan_to_num().reshape(-1)
    sequence = (logprobs * mask).sum(-1)
    loss = -(advantages * sequence).mean()
    return loss, {"loss": loss.detach(), "toy_advantage_abs": advantages.abs().mean()}


@pytest.fixture
def toy_loss():
    from eva_ray.losses import LOSSES, LossSpec, register_loss

    calls: list[dict] = []
    register_loss(LossSpec("toy", lambda *a, **k: _toy_loss(*a, **k, calls=calls), view="groups", unit="sequence",
                           reference="never"))
    yield calls
    LOSSES.pop("toy")


@pytest.mark.slow
def test_a_loss_registered_from_outside_trains_a_real_run(toy_loss, tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("EVA_RAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "solver.algorithm=toy", *SHORT_RUN])
    summary = run(cfg, inline=True, echo=lambda line: None)
    assert summary.steps_done == 3 and summary.error is None
    rows = [r for r in _rows(summary.run_dir) if "train/loss" in r]
    assert rows and all("train/toy_advantage_abs" in r for r in rows)  # the loss's own stats are logged
    assert not any("train/kl" in r for r in rows)  # reference "never": no reference model, no KL
    # The learner called it on whole groups (n_responses each) with the configured beta and no reference.
    groups = {c["rewards"] for c in toy_loss}
    assert groups and all(n == cfg.solver.n_responses for _, n in groups)
    assert all(c["ref"] is None and c["beta"] == cfg.solver.beta for c in toy_loss)
    assert summary.final["weight_change"] > 0  # its gradient moved the policy
