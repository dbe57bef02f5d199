"""`eva-ray plan` and the plan check of `eva-ray run`, as a user runs them: exit codes and the one-line error."""

import os
import subprocess
import sys
from pathlib import Path

from eva_ray.config import load_config
from launch.cli import _check_plan_before_run

ROOT = Path(__file__).resolve().parents[2]
RLOO = "configs/gemma2-9b-rloo-8xh100.yaml"
ONE_RANK = ["resources.learner.num_workers=1", "learner.offload_optimizer=false"]  # the whole 9B learner on one GPU


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**environ, **(env or {})})


def test_plan_prints_the_layout_and_exits_0_for_both_paper_configs():
    for config in (RLOO, "configs/gemma2-9b-oaif-8xh100.yaml"):
        out = cli("plan", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "target: 1 node(s) x 8 GPU(s) x 80 GB (from config)" in out.stdout
        assert "rollout-4    node 0, GPU 7" in out.stdout
        assert out.stdout.rstrip().endswith("fits")


def test_an_overflowing_layout_exits_1_with_one_line_naming_it():
    out = cli("plan", "--config", RLOO, *ONE_RANK)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("eva-ray: plan does not fit: learner-0 on node 0 GPU 0 needs")
    assert "GB over" in lines[0] and "optimizer" in lines[0]


def test_flags_override_the_config_target_and_too_few_gpus_name_the_role():
    out = cli("plan", "--config", RLOO, "--nodes", "1", "--gpus-per-node", "6")
    assert out.returncode == 1
    assert out.stderr.strip() == ("eva-ray: plan does not fit: rollout engine 3 needs 1 GPU(s) on one node and "
                                  "none are left: the target has 6 GPU(s) (1 node(s)), already taken: learner 2, "
                                  "reward 1, rollout 3")
    big = cli("plan", "--config", RLOO, "resources.rollout.num_workers=3", "learner.offload_optimizer=false",
              "--gpu-memory-gb", "141", "--gpus-per-node", "6")
    assert "(from command line)" in big.stdout and big.returncode == 0, big.stderr


def test_a_bad_config_is_a_config_error_with_exit_2():
    out = cli("plan", "--config", RLOO, "learner.offload_params=true", "learner.zero_stage=2")
    assert out.returncode == 2
    assert "learner.offload_params: needs learner.zero_stage 3" in out.stderr


def test_run_refuses_a_gpu_config_that_does_not_fit_before_starting_anything():
    out = cli("run", "--config", RLOO, *ONE_RANK)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("eva-ray: plan does not fit: learner-0 on node 0 GPU 0")
    assert "Ray" not in out.stdout  # no cluster was joined or started


def test_run_skips_the_plan_on_cpu_only_configs():
    # The CPU configs ask for no GPUs: nothing is planned, not even the model shapes are read.
    for config in ("configs/tiny.yaml", "launch/default_run.yaml", "configs/chain_sum.yaml",
                   "configs/smollm2-mtbench.yaml"):
        assert _check_plan_before_run(load_config(ROOT / config, ["model.path=org/no-shape-anywhere"])) == 0
    assert _check_plan_before_run(load_config(ROOT / RLOO, ONE_RANK)) == 1


def test_plan_prints_the_checkpoint_size_under_the_memory_table():
    out = cli("plan", "--config", RLOO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    size = next(i for i, line in enumerate(lines) if line.startswith("checkpoint: "))
    assert lines[size - 1].lstrip().startswith("0     7    rollout-4")  # the table's last row
    # gemma-2-9b under ZeRO-3 in bf16: fp32 master weights and AdamW's two moments, 12 bytes a parameter.
    assert lines[size].startswith("checkpoint: ~110.9 GB each (learner 110.9 GB at ZeRO-3 in bfloat16, creator ")
    assert "keeping 2 while writing the next needs ~332.7 GB" in lines[size]


OFFLINE_DPO = "configs/gemma2-9b-dpo-offline-8xh100.yaml"
# The loss registry's "dpo" where it has one; else (a branch without the offline losses) a stand-in with the paper's
# DPO recipe, registered by a plugin module that only this test puts on the path.
_DPO_STANDIN = '''
from eva_ray.losses import LOSSES, LossSpec, TrainingDefaults, register_loss
if "dpo" not in LOSSES:
    register_loss(LossSpec("dpo", "eva_ray.losses.dpo:oaif_loss", view="pairs", unit="group", reference="always",
                           beta_positive=True, defaults=TrainingDefaults(
                               beta=0.05, lr=5e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=2, batch_size=8,
                               max_length=2048, max_prompt_length=1024, optimizer="adamw")))
'''


def test_plan_passes_on_the_offline_dpo_config_and_names_the_overflow_on_2_gpus(tmp_path):
    (tmp_path / "dpo_standin.py").write_text(_DPO_STANDIN)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    out = cli("plan", "--config", OFFLINE_DPO, "run.plugins=[dpo_standin]", env=env)
    assert out.returncode == 0, out.stderr
    assert "rollout-2    node 0, GPU 7" in out.stdout and "offline dpo: the learner trains pairs" in out.stdout
    assert out.stdout.rstrip().endswith("fits")
    small = cli("plan", "--config", OFFLINE_DPO, "--gpus-per-node", "2", "run.plugins=[dpo_standin]",
                "resources.learner.num_workers=1", "resources.rollout.num_workers=1", "resources.reward.num_gpus=0",
                env=env)
    assert small.returncode == 1
    (line,) = small.stderr.strip().splitlines()
    assert line.startswith("eva-ray: plan does not fit: learner-0 on node 0 GPU 0 needs ")
    assert "GB over (largest term: optimizer" in line
