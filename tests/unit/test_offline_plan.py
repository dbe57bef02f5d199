"""eva-ray plan on offline runs: the learner holds the recipe's pairs (the loss's max_length and batch), the
reference only where the loss reads it, and the optimizer the recipe names."""

from __future__ import annotations

from pathlib import Path

import pytest

from eva_ray.config import load_config
from eva_ray.memory import LearnerSetup, ModelShape, learner_memory
from launch.plan import PlanError, Target, check_plan, format_plan, learner_load, make_plan

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ROOT / "configs" / "gemma2-9b-dpo-offline-8xh100.yaml"
H100X8 = Target(1, 8, 80)
GEMMA = ModelShape.from_config_file(ROOT / "configs" / "models" / "gemma-2-9b-it" / "config.json")
# What fits on one node with 2 GPUs: one learner rank, one engine, ArmoRM on CPU.
TWO_GPUS = ["resources.learner.num_workers=1", "resources.rollout.num_workers=1", "resources.reward.num_gpus=0"]


def learner_terms(plan, i: int = 0) -> dict[str, float]:
    return next(u.estimate.terms for u in plan.gpus if u.actor == f"learner-{i}")


def test_the_offline_8xh100_config_fits_with_the_layout_its_header_names(offline_losses):
    cfg = load_config(OFFLINE)
    assert (cfg.run.mode, cfg.solver.algorithm, cfg.offline.iterations, cfg.offline.prompts_per_iteration,
            cfg.offline.responses_per_prompt, cfg.rollout.backend) == ("offline", "dpo", 3, 10000, 6, "vllm")
    plan = check_plan(cfg, H100X8)
    where = {p.name: p.gpus for p in plan.placements}
    assert [where[f"learner-{i}"] for i in range(4)] == [(0,), (1,), (2,), (3,)]
    assert where["reward-0"] == (4,) and [where[f"rollout-{i}"] for i in range(3)] == [(5,), (6,), (7,)]
    # The learner holds the recipe's pairs, not the online rollout length: DPO's 2,048 tokens, 1,024 of response.
    load = learner_load(cfg)
    assert (load.seq_len, load.logit_tokens, load.micro_batch, load.reference, load.optimizer) == \
        (2048, 1025, 2, True, "adamw")
    expected = learner_memory(GEMMA, LearnerSetup(ranks=4, zero_stage=3, micro_batch=2, seq_len=2048,
                                                  logit_tokens=1025, checkpointing=True, reference="sharded"))
    assert learner_terms(plan) == expected.terms
    text = format_plan(plan)
    assert "offline dpo: the learner trains pairs of up to 2048 tokens (1024 of response), 2 sequences per " \
           "micro-batch, 8 pairs per update, adamw, with reference model" in text
    assert text.rstrip().endswith("fits")


def test_on_one_node_of_2_gpus_the_learner_overflows_by_name(offline_losses):
    cfg = load_config(OFFLINE, TWO_GPUS)
    plan = make_plan(cfg, Target(1, 2, 80))
    assert not plan.fits
    line = plan.error_line()
    assert line.startswith("learner-0 on node 0 GPU 0 needs ") and " GB of 80 GB: " in line
    assert "GB over (largest term: optimizer" in line
    assert format_plan(plan).rstrip().endswith(f"does not fit: {line}")
    # The config as shipped asks for 8 GPUs: on 2 the fifth actor that needs one finds none, and is named.
    with pytest.raises(PlanError, match=r"learner rank 2 needs 1 GPU\(s\) on one node and none are left: the "
                                        r"target has 2 GPU\(s\)"):
        make_plan(load_config(OFFLINE), Target(1, 2, 80))


def test_a_reference_free_loss_holds_no_reference_and_rmsprop_one_state(offline_losses):
    simpo_cfg = load_config(OFFLINE, ["solver.algorithm=test_simpo"])
    simpo = make_plan(simpo_cfg, H100X8)
    assert not learner_load(simpo_cfg).reference and "reference" not in learner_terms(simpo)
    assert "no reference model" in format_plan(simpo)
    dpo = learner_terms(make_plan(load_config(OFFLINE), H100X8))
    sppo = learner_terms(make_plan(load_config(OFFLINE, ["solver.algorithm=test_sppo"]), H100X8))
    assert sppo["reference"] == dpo["reference"] > 0
    assert sppo["optimizer"] == pytest.approx(dpo["optimizer"] * (4 + 4) / (4 + 8))  # master + 1 state, not 2
    assert sppo["activations"] < dpo["activations"]  # SPPO's 1,024-token sequences


def test_offline_knobs_reach_the_plan_and_the_micro_batch_is_at_most_one_update(offline_losses):
    cfg = load_config(OFFLINE, ["offline.max_length=4096", "offline.batch_size=1", "learner.micro_batch_size=8"])
    load = learner_load(cfg)
    assert (load.seq_len, load.logit_tokens, load.micro_batch) == (4096, 4096 - 1024 + 1, 2)
    # Online, the same config's learner holds rollouts as before.
    online = learner_load(load_config(OFFLINE, ["run.mode=online", "solver.algorithm=oaif"]))
    assert (online.seq_len, online.logit_tokens, online.micro_batch, online.note) == (2048, 1025, 2, "")
