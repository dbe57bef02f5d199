"""Pieces of the driver that need no actors: the staleness bound, rollout metrics, the progress line."""

import math

import pytest

from eva_ray.rollouts import Rollout
from launch.driver import StalePolicyError, check_staleness, rollout_metrics
from launch.progress import Progress


def rollout(version, n_tokens=3, reason="stop"):
    return Rollout(prompt_id="p", prompt_token_ids=[1, 2], response_token_ids=list(range(n_tokens)), text="x",
                   finish_reason=reason, policy_version=version)


def test_staleness_within_bound_returns_the_lag_and_past_it_raises():
    groups = [[rollout(4), rollout(5)], [rollout(5)]]
    assert check_staleness(groups, learner_version=5, max_staleness=1) == 1
    assert check_staleness(groups, learner_version=4, max_staleness=0) == 0
    with pytest.raises(StalePolicyError, match="lags 2 policy versions behind the learner .version 6.; "
                                               "learner.max_staleness is 1"):
        check_staleness(groups, learner_version=6, max_staleness=1)


def test_rollout_metrics_skip_non_finite_rewards():
    groups = [[rollout(0, 2), rollout(0, 4, "length")]]
    m = rollout_metrics(groups, [[1.0, float("nan")]], seconds=2.0)
    assert m["reward_mean"] == 1.0 and m["reward_nonfinite"] == 1
    assert m["response_length_mean"] == 3.0 and m["stop_fraction"] == 0.5 and m["tokens_per_s"] == 3.0
    assert math.isnan(rollout_metrics(groups, [[float("nan")] * 2], 1.0)["reward_mean"])


def test_progress_line_shows_phase_rate_and_eta():
    lines = []
    progress = Progress(10, echo=lines.append)
    progress.update(5, {"buffer": {"phase": 1, "size": 7, "capacity": 12}, "rollout": {"reward_mean": 0.25},
                        "train": {"loss": 0.5}, "creator": {"evolve_ok": 3}, "eval": {"win_rate": 0.75}})
    (line,) = lines
    assert line.startswith("step 5/10 [mix-up] reward 0.25 loss 0.5 buffer 7/12 evolve ok 3")
    assert "win-rate 0.75" in line and "step/s" in line and "ETA" in line and "pending" not in line
    Progress(10, enabled=False, echo=lines.append).update(1, {})
    assert len(lines) == 1
    progress.update(6, {"creator": {"evolve_ok": 0, "in_flight": 2}})  # a slow evolve LLM is visibly busy
    assert "evolve ok 0 rej 0 fail 0 pending 2 |" in lines[-1]


def test_summary_lines_report_phases_evolving_and_outputs():
    from launch.driver import RunSummary, summary_lines

    summary = RunSummary(run_dir="/runs/x", steps_done=4, rollouts=32, phases=["warm-up", "warm-up", "mix-up", "bootstrap"],
                         eval={"win_rate": 0.625, "n_prompts": 8},
                         final={"creator": {"evolve_requested": 10, "evolve_ok": 7, "evolve_rejected_total": 2,
                                            "evolve_rejected": {"empty": 2}, "evolve_failed_total": 1,
                                            "evolve_failed": {"Timeout": 1}},
                                "buffer": {"size": 5, "capacity": 8, "generations": {1: 4, 2: 1}, "operators": {}},
                                "weight_change": 0.5, "learner_version": 4})
    text = "\n".join(summary_lines(summary))
    assert "done, 4 steps, 32 rollouts (warm-up 2, mix-up 1, bootstrap 1)" in text
    assert "10 requested, 7 ok, 2 rejected {'empty': 2}, 1 failed {'Timeout': 1}" in text
    assert "win-rate against the initial policy: 0.625 on 8 held-out prompts" in text
    assert "outputs: /runs/x" in text and "still at the evolve LLM" not in text
    summary.final["evolve_tasks_unfinished"] = 3
    assert "3 batches were still at the evolve LLM" in "\n".join(summary_lines(summary))
