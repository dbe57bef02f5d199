"""The memory estimator and the layout rule: per-stage formulas, offload, checkpointing, overflow, calibration."""

from pathlib import Path

import pytest

from eva_ray.config import load_config
from eva_ray.memory import (
    BF16, FP32, GB, LearnerSetup, ModelShape, activation_bytes_per_token_layer, learner_memory, logits_bytes,
    training_activation_bytes, vllm_memory,
)
from launch.plan import PlanError, Target, check_plan, find_model_shape, format_plan, make_plan

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"
RLOO = ROOT / "configs" / "gemma2-9b-rloo-8xh100.yaml"
OAIF = ROOT / "configs" / "gemma2-9b-oaif-8xh100.yaml"
# The layout the configs' header names as the alternative: 4 learner ranks without offload, 3 engines.
FOUR_RANKS = ["resources.learner.num_workers=4", "resources.rollout.num_workers=3", "learner.offload_optimizer=false"]


@pytest.fixture(scope="module")
def qwen() -> ModelShape:
    return ModelShape.from_config_file(MODELS / "qwen2-0.5b-shape" / "config.json")


@pytest.fixture(scope="module")
def gemma() -> ModelShape:
    return ModelShape.from_config_file(MODELS / "gemma-2-9b-it" / "config.json")


def test_parameter_counts_match_the_published_sizes(qwen, gemma):
    assert qwen.params == pytest.approx(494.0e6, rel=0.002)  # Qwen2-0.5B: 494M with tied embeddings
    assert gemma.params == pytest.approx(9.24e9, rel=0.005)
    armo = ModelShape.from_config_file(MODELS / "ArmoRM-Llama3-8B-v0.1" / "config.json")
    # Llama-3-8B is 8.03B with its LM head; a reward model scores hidden states and has none.
    assert not armo.has_lm_head
    assert armo.params + armo.embedding_params == pytest.approx(8.03e9, rel=0.005)


def test_states_per_zero_stage_follow_the_partitioning(qwen):
    p, n = qwen.params, 4
    terms = {z: learner_memory(qwen, LearnerSetup(ranks=n, zero_stage=z, reference="none")).terms for z in range(4)}
    # ZeRO-0: nothing partitioned: 2 (bf16) + 2 + 4 (grads) + 12 (master, m, v) bytes per parameter.
    assert terms[0]["weights"] + terms[0]["gradients"] + terms[0]["optimizer"] == pytest.approx(20 * p)
    assert "buckets" not in terms[0]
    # ZeRO-1 partitions the fp32 side only; ZeRO-2 the bf16 gradients too.
    assert terms[1]["optimizer"] == pytest.approx(12 * p / n)
    assert terms[1]["gradients"] == pytest.approx(BF16 * p + FP32 * p / n)
    assert terms[2]["gradients"] == pytest.approx((BF16 + FP32) * p / n)
    assert terms[2]["weights"] == pytest.approx(BF16 * p)
    # ZeRO-3 partitions the bf16 weights as well, keeping a gathered working set on top.
    assert BF16 * p / n < terms[3]["weights"] < BF16 * p
    totals = [learner_memory(qwen, LearnerSetup(ranks=n, zero_stage=z)).total for z in range(4)]
    assert totals[0] > totals[1] > totals[2] > totals[3]


def test_offload_moves_optimizer_state_and_parameters_off_the_gpu(gemma):
    base = LearnerSetup(ranks=2, zero_stage=3, micro_batch=1, seq_len=2048, checkpointing=True, reference="none")
    on_gpu = learner_memory(gemma, base).terms
    opt_off = learner_memory(gemma, LearnerSetup(**{**vars(base), "offload_optimizer": True})).terms
    both_off = learner_memory(gemma, LearnerSetup(**{**vars(base), "offload_optimizer": True,
                                                     "offload_params": True})).terms
    assert opt_off["optimizer"] == 0 and on_gpu["optimizer"] == pytest.approx(12 * gemma.params / 2)
    assert opt_off["gradients"] == pytest.approx(BF16 * gemma.params / 2)  # the fp32 copy went with the optimizer
    assert both_off["weights"] < opt_off["weights"] - BF16 * gemma.params / 2 * 0.99
    with pytest.raises(ValueError, match="ZeRO-3"):
        learner_memory(gemma, LearnerSetup(zero_stage=2, offload_params=True))


def test_checkpointing_keeps_one_layer_input_per_layer(qwen):
    tokens = 8 * 1024
    full = training_activation_bytes(qwen, tokens, checkpointing=False)
    ckpt = training_activation_bytes(qwen, tokens, checkpointing=True)
    per_layer = activation_bytes_per_token_layer(qwen) * tokens
    assert full > qwen.layers * per_layer * 0.99
    outside = (BF16 + FP32 + BF16) * qwen.hidden * tokens  # embedding output and the final norm
    assert ckpt == qwen.layers * BF16 * qwen.hidden * tokens + per_layer + outside
    assert ckpt < full / 5


def test_logits_scale_with_vocab_and_positions(qwen, gemma):
    assert logits_bytes(qwen, 1000) == 8 * qwen.vocab * 1000
    assert logits_bytes(gemma, 1000) == 12 * gemma.vocab * 1000  # soft-capping keeps two more bf16 tensors


@pytest.mark.parametrize("stage,measured_gb", [(0, 31), (2, 37), (3, 39)])
def test_calibration_within_25_percent_of_the_h200_peaks(qwen, stage, measured_gb):
    """Qwen2-0.5B shape, bf16, client AdamW, 8 x 1024 tokens on one GPU (docs/memory.md)."""
    est = learner_memory(qwen, LearnerSetup(ranks=1, zero_stage=stage, micro_batch=8, seq_len=1024,
                                            reference="none"))
    assert est.total / GB == pytest.approx(measured_gb, rel=0.25)


def test_vllm_claims_its_share_and_names_a_cache_too_small(gemma):
    est = vllm_memory(gemma, 1, 80 * GB, 2048, gpu_memory_utilization=0.85)
    assert est.total == pytest.approx(0.85 * 80 * GB + est.context)
    assert est.terms["kv_cache"] == pytest.approx(0.85 * 80 * GB - BF16 * gemma.params - est.terms["runtime"])
    cfg = load_config(RLOO, ["rollout.gpu_memory_utilization=0.26"])
    plan = make_plan(cfg, Target(1, 8, 80))
    assert not plan.fits and "KV cache holds" in plan.error_line() and "rollout-0" in plan.error_line()


def test_both_paper_configs_fit_8x80gb_with_the_planned_layout():
    for path in (RLOO, OAIF):
        plan = check_plan(load_config(path), Target(1, 8, 80))
        roles = [(p.role, p.node, p.gpus) for p in plan.placements]
        assert roles[:2] == [("learner", 0, (i,)) for i in range(2)]
        assert ("reward", 0, (2,)) in roles
        assert [r for r in roles if r[0] == "rollout"] == [("rollout", 0, (g,)) for g in (3, 4, 5, 6, 7)]
        assert plan.placement("creator").gpus == () and plan.placement("creator").node is None
        groups = {g.name: g for g in plan.groups}
        assert groups["learner"].bundles == ({"CPU": 4.0, "GPU": 1.0},) * 2
        assert groups["rollout"].strategy == "PACK"
        assert all(u.estimate.total < 80 * GB for u in plan.gpus)
        assert "fits" in format_plan(plan)
        four = check_plan(load_config(path, FOUR_RANKS), Target(1, 8, 80))
        assert [p.gpus for p in four.placements if p.role == "learner"] == [(i,) for i in range(4)]
        assert four.placement("reward").gpus == (4,)


def test_the_whole_9b_learner_on_one_gpu_overflows_by_name():
    cfg = load_config(RLOO, ["resources.learner.num_workers=1", "learner.offload_optimizer=false"])
    plan = make_plan(cfg, Target(1, 8, 80))
    line = plan.error_line()
    assert not plan.fits and "\n" not in line
    assert line.startswith("learner-0 on node 0 GPU 0 needs")
    over = float(line.split(": ")[1].split(" GB over")[0])
    assert over == pytest.approx(plan.gpus[0].estimate.total / GB - 80, abs=0.1)
    with pytest.raises(PlanError, match="learner-0"):
        check_plan(cfg, Target(1, 8, 80))


def test_running_out_of_gpus_names_the_role():
    cfg = load_config(RLOO, FOUR_RANKS)
    with pytest.raises(PlanError, match="^rollout engine 0 needs 1 GPU"):
        make_plan(cfg, Target(1, 5, 80))
    with pytest.raises(PlanError, match="^rollout engine 1 needs 2 GPU"):
        make_plan(load_config(RLOO, [*FOUR_RANKS, "rollout.tensor_parallel_size=2"]), Target(1, 8, 80))


def test_tensor_parallel_engines_and_spread():
    offload = ["resources.learner.num_workers=2", "learner.offload_optimizer=true"]
    plan = make_plan(load_config(RLOO, [*offload, "rollout.tensor_parallel_size=2",
                                        "resources.rollout.num_workers=2"]), Target(2, 4, 80))
    # node 0: learner 0-1, reward 2, one GPU left: too few for a TP-2 engine, so both go to node 1.
    assert [(p.node, p.gpus) for p in plan.placements if p.role == "rollout"] == [(1, (0, 1)), (1, (2, 3))]
    assert {g.name: (g.strategy, len(g.bundles)) for g in plan.groups}["rollout-1"] == ("STRICT_PACK", 2)
    packed = make_plan(load_config(RLOO, [*offload, "resources.rollout.num_workers=4"]), Target(2, 4, 80))
    assert [packed.placement("rollout", i).node for i in range(4)] == [0, 1, 1, 1]
    spread = make_plan(load_config(RLOO, [*offload, "resources.rollout.num_workers=4",
                                          "resources.placement=SPREAD"]), Target(2, 4, 80))
    assert [spread.placement("rollout", i).node for i in range(4)] == [1, 1, 1, 0]
    with pytest.raises(PlanError, match="STRICT_SPREAD"):
        make_plan(load_config(RLOO, [*offload, "resources.rollout.num_workers=3",
                                     "resources.placement=STRICT_SPREAD"]), Target(2, 4, 80))


def test_reference_actor_takes_the_gpu_after_the_learners():
    plan = make_plan(load_config(OAIF, [*FOUR_RANKS, "learner.reference_placement=actor",
                                        "resources.rollout.num_workers=2"]),
                     Target(1, 8, 80))
    assert plan.placement("reference").gpus == (4,)
    assert plan.placement("reward").gpus == (5,)
    assert "reference" not in plan.gpus[0].estimate.terms


def test_shapes_come_from_shipped_files_tiny_models_and_clear_errors():
    assert find_model_shape("google/gemma-2-9b-it").layers == 42
    assert find_model_shape("tiny:policy").hidden == 64
    with pytest.raises(Exception, match="configs/models/no-such-model/config.json"):
        find_model_shape("org/no-such-model")


def test_soft_capped_attention_counts_the_eager_score_matrices(qwen, gemma):
    from eva_ray.memory import eager_score_bytes

    assert gemma.attention_softcap and not qwen.attention_softcap
    assert eager_score_bytes(qwen, 2, 2048, qwen.layers) == 0
    assert eager_score_bytes(gemma, 2, 2048, 1) == 8 * gemma.heads * 2048 ** 2 * 2
    setup = LearnerSetup(zero_stage=3, ranks=2, micro_batch=2, seq_len=2048, checkpointing=True)
    full = learner_memory(gemma, LearnerSetup(**{**vars(setup), "checkpointing": False})).terms["activations"]
    checkpointed = learner_memory(gemma, setup).terms["activations"]
    assert full - checkpointed > (gemma.layers - 1) * eager_score_bytes(gemma, 2, 2048, 1) * 0.99


def test_the_reward_model_is_counted_in_its_dtype(gemma):
    from eva_ray.memory import reward_memory

    plan = make_plan(load_config(RLOO, FOUR_RANKS + ["reward.dtype=float32"]), Target(1, 8, 80))
    bf16 = make_plan(load_config(RLOO, FOUR_RANKS), Target(1, 8, 80))
    weights = [{u.actor: u.estimate.terms["weights"] for u in p.gpus}["reward-0"] for p in (plan, bf16)]
    assert weights[0] == 2 * weights[1]
    half = reward_memory(gemma, 4, 512).terms
    full = reward_memory(gemma, 4, 512, "float32").terms
    assert full["weights"] == 2 * half["weights"] and full["activations"] == 2 * half["activations"]
