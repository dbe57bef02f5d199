"""The learner on a real DeepSpeed engine (ZeRO 0, 2 and 3 on CPU, gloo) with a tiny real Llama.

Each learner is built for the test that needs it (a tiny engine starts in well under a second once DeepSpeed is
imported) and closed at the end, so the process group is created and destroyed as in a real run.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

from eva_ray.batching import TrainBatch, collate
from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig
from eva_ray.rollouts import Rollout
from eva_ray.tiny import save_tiny_models

pytestmark = pytest.mark.slow

P, N = 8, 4


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


@pytest.fixture(scope="module")
def groups() -> list[list[Rollout]]:
    """8 prompts x 4 responses, prompts of 6-12 tokens, responses of 16-32 (ids of printable characters)."""
    rng = random.Random(0)
    out = []
    for p in range(P):
        prompt = [rng.randrange(7, 103) for _ in range(rng.randint(6, 12))]
        out.append([Rollout(f"p{p}", prompt, [rng.randrange(7, 103) for _ in range(rng.randint(16, 32))], "",
                            "length", 0) for _ in range(N)])
    return out


def make_learner(path: str, *, stage: int = 0, algorithm: str = "rloo", beta: float = 0.05, lr: float = 1e-3,
                 micro: int = 8, total_steps: int = 10, warmup_ratio: float = 0.0, schedule: str = "constant",
                 checkpointing: bool = False, optimizer: str = "adamw", **solver_kw):
    from actors.learner import Learner

    return Learner(path, solver=SolverConfig(algorithm=algorithm, beta=beta, **solver_kw),
                   learner=LearnerConfig(zero_stage=stage, lr=lr, micro_batch_size=micro, lr_schedule=schedule,
                                         warmup_ratio=warmup_ratio, gradient_checkpointing=checkpointing,
                                         optimizer=optimizer),
                   model=ModelConfig(), total_steps=total_steps, seed=0)


def spread_rewards() -> torch.Tensor:
    return torch.randn(P, N, generator=torch.Generator().manual_seed(1))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def seq_logprobs(state: dict[str, torch.Tensor], path: str, batch: TrainBatch) -> torch.Tensor:
    """[B] summed response log-probs under a plain HF model holding ``state``."""
    from transformers import AutoModelForCausalLM

    from eva_ray.losses import sequence_logprobs, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[:, batch.prompt_width - 1:-1]
    return sequence_logprobs(token_logprobs(logits, batch.response_ids), batch.response_token_mask)


def test_rloo_step_updates_weights_identically_under_zero_0_2_3_and_any_micro_batch(policy_path, groups):
    batch = collate(groups, spread_rewards(), pad_token_id=0)
    results = {}
    for stage, micro, checkpointing in [(0, 32, False), (0, 8, False), (2, 8, True), (3, 4, False)]:
        learner = make_learner(policy_path, stage=stage, micro=micro, checkpointing=checkpointing)
        try:
            v0, before = learner.get_weights()
            metrics = learner.train_step(batch)
            v1, after = learner.get_weights()
        finally:
            learner.close()
        assert (v0, v1, learner.version) == (0, 1, 1)
        assert metrics["train/skipped"] == 0 and metrics["train/updates"] == 1 and metrics["train/version"] == 1
        assert metrics["train/tokens"] == batch.num_response_tokens and metrics["train/sequences"] == P * N
        assert metrics["train/advantage_std"] > 0 and metrics["train/grad_norm"] > 0
        assert math.isfinite(metrics["train/entropy"]) and metrics["timing/learner_s"] > 0
        assert max_diff(before, after) > 1e-4  # the step moved the weights
        results[(stage, micro, checkpointing)] = (metrics, after)
    # Accumulating share-weighted micro-batch losses is exact, and every ZeRO stage computes the same update. The
    # gradient norm checks the scale (a wrong share would change it); the weights check the direction. Adam's
    # first update is about lr * g / |g| per element, so rounding in a near-zero g can move an element by a
    # fraction of lr (5e-6 seen at lr 1e-3), while a wrong direction moves it by up to 2 lr.
    ref_metrics, ref_state = results[(0, 32, False)]
    for key, (metrics, state) in results.items():
        assert metrics["train/loss"] == pytest.approx(ref_metrics["train/loss"], rel=1e-5, abs=1e-7), key
        assert metrics["train/grad_norm"] == pytest.approx(ref_metrics["train/grad_norm"], rel=1e-5), key
        assert max_diff(state, ref_state) < 1e-4, key


def test_batch_without_reward_spread_is_skipped_and_changes_nothing(policy_path, groups):
    # Equal rewards with beta > 0: the only gradient would be the KL term, the case that collapsed a tiny model.
    batch = collate(groups, torch.ones(P, N), pad_token_id=0)
    hook = sys.excepthook
    learner = make_learner(policy_path, stage=2, beta=0.1)
    try:
        _, before = learner.get_weights()
        metrics = learner.train_step(batch)
        version, after = learner.get_weights()
        distance = learner.distance_from_reference()
    finally:
        learner.close()
    assert metrics["train/skipped"] == 1 and metrics["train/updates"] == 0 and metrics["train/spread_fraction"] == 0
    assert version == 0 and max_diff(before, after) == 0 and distance == 0
    # Closing the last learner takes down its process group and torch's "[rankN]: " excepthook wrapper with it.
    assert not torch.distributed.is_initialized() and sys.excepthook is hook


def test_oaif_step_trains_on_one_pair_per_prompt_with_spread(policy_path, groups):
    rewards = spread_rewards()
    rewards[[1, 4, 6]] = 0.5  # three prompts tie: no pair
    rewards[2, 1:] = float("nan")  # one finite reward: no pair
    batch = collate(groups, rewards, pad_token_id=0)
    learner = make_learner(policy_path, stage=2, algorithm="oaif", beta=0.1, micro=4)
    try:
        _, before = learner.get_weights()
        metrics = learner.train_step(batch)
        version, after = learner.get_weights()
    finally:
        learner.close()
    assert metrics["train/n_pairs"] == 4 and metrics["train/sequences"] == 8
    assert metrics["train/pair_fraction"] == 1.0  # of the pair batch: every kept prompt has its pair
    assert metrics["train/skipped"] == 0 and version == 1 and max_diff(before, after) > 1e-4
    # Before the step the policy *is* the reference: every implicit reward is 0 and the loss is log 2.
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["train/rewards_margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)


def test_zero3_get_weights_are_full_hf_weights_that_match_the_engine(policy_path, groups, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = collate(groups, spread_rewards(), pad_token_id=0)
    linear = torch.nn.functional.linear
    learner = make_learner(policy_path, stage=3, micro=16)
    try:
        # Built under zero.Init: every parameter starts partitioned (empty here, its real shape in ds_shape).
        # (Parameters below DeepSpeed's persistence threshold, all of them in this tiny model, stay gathered after
        # the first forward.)
        assert all(p.numel() == 0 for p in learner.engine.module.parameters())
        shapes = {n: tuple(p.ds_shape) for n, p in learner.engine.module.named_parameters()}
        learner.train_step(batch)
        version, state = learner.get_weights()
        with torch.no_grad():
            engine_logits = learner.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           position_ids=batch.position_ids).logits
        learner.save(str(tmp_path / "ckpt"))
        # Loaded while the ZeRO-3 learner is alive (as an inline rollout worker would be): still a plain model.
        fresh = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    finally:
        learner.close()
    assert version == 1
    assert torch.nn.functional.linear is linear  # ZeRO-3's process-wide replacement is undone on close
    assert all(tuple(state[n].shape) == s for n, s in shapes.items())
    assert all(p.numel() > 0 and not hasattr(p, "ds_id") for p in fresh.parameters())
    fresh.load_state_dict(state, strict=True)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
        assert torch.allclose(fresh(**kwargs).logits, engine_logits, atol=1e-5)
        assert torch.allclose(saved(**kwargs).logits, engine_logits, atol=1e-5)
    assert (tmp_path / "ckpt" / "tokenizer_config.json").exists()


def test_rloo_raises_the_rewarded_response_and_the_loss_falls(policy_path, groups):
    rewards = torch.zeros(P, N)
    rewards[:, 0] = 1.0  # in every group the first response is the good one
    batch = collate(groups, rewards, pad_token_id=0)
    learner = make_learner(policy_path, stage=0, beta=0.0, lr=3e-3, micro=16)
    try:
        assert learner.reference is None  # RLOO with beta = 0 needs no reference model
        _, start = learner.get_weights()
        losses = [learner.train_step(batch)["train/loss"] for _ in range(5)]
        _, end = learner.get_weights()
        distance = learner.distance_from_reference()  # no reference model: measured against the start
    finally:
        learner.close()
    params = [k for k in start if k != "lm_head.weight"]  # tied to the embedding: count it once
    assert distance == pytest.approx(math.sqrt(sum((end[k] - start[k]).square().sum().item() for k in params)),
                                     rel=1e-4)
    assert losses[-1] < losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= 3, losses
    gain = seq_logprobs(end, policy_path, batch) - seq_logprobs(start, policy_path, batch)
    rewarded = torch.zeros(P, N, dtype=torch.bool)
    rewarded[:, 0] = True
    assert gain[rewarded.flatten()].mean() > 0 > gain[~rewarded.flatten()].mean()


def test_lr_warms_up_then_decays_and_skipped_batches_keep_the_schedule(policy_path, groups):
    from actors.learner import lr_multiplier

    cosine = lr_multiplier("cosine", 4, 0.5)  # warm-up of 2 updates, then cosine over the other 2
    assert [cosine(k) for k in range(5)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert [lr_multiplier("linear", 5, 0.2)(k) for k in range(5)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_multiplier("constant", 3, 0.0)(k) for k in range(3)] == [1.0, 1.0, 1.0]

    good = collate(groups, spread_rewards(), pad_token_id=0)
    flat = collate(groups, torch.zeros(P, N), pad_token_id=0)
    learner = make_learner(policy_path, stage=0, lr=1e-3, total_steps=4, warmup_ratio=0.5, schedule="cosine",
                           micro=32)
    try:
        lrs = [learner.train_step(b)["train/lr"] for b in (good, flat, good, good)]
        assert learner.version == 3  # the flat batch was skipped
    finally:
        learner.close()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_nonfinite_loss_skips_the_step_without_touching_other_weights(policy_path, groups):
    batch = collate(groups, spread_rewards(), pad_token_id=0)
    poisoned = groups[0][0].response_token_ids[0]
    learner = make_learner(policy_path, stage=0)
    try:
        with torch.no_grad():
            learner.engine.module.get_input_embeddings().weight[poisoned] = float("nan")
        _, before = learner.get_weights()
        metrics = learner.train_step(batch)
        version, after = learner.get_weights()
    finally:
        learner.close()
    assert metrics["train/nonfinite_loss"] == 1 and metrics["train/skipped"] == 1 and version == 0
    same = {k: torch.equal(before[k], after[k]) or bool(torch.isnan(before[k]).any()) for k in before}
    assert all(same.values())


def test_several_updates_per_batch_use_clipped_ratios_and_count_versions(policy_path, groups):
    batch = collate(groups, spread_rewards(), pad_token_id=0)
    learner = make_learner(policy_path, stage=2, micro=16, updates_per_batch=3, clip_eps=0.2)
    try:
        metrics = learner.train_step(batch)
        version, _ = learner.get_weights()
    finally:
        learner.close()
    assert metrics["train/updates"] == 3 and version == 3 and metrics["train/version"] == 3
    # Logged stats describe the first update, where pi == pi_old: the ratio is 1 and nothing is clipped.
    assert metrics["train/clip_fraction"] == 0 and metrics["train/loss"] == pytest.approx(0.0, abs=1e-6)
