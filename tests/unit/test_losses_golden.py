"""Golden tests: eva_ray.losses against TRL 1.16.0 on the same random tensors.

Where TRL has a function that works on tensors, it is called directly (``selective_log_softmax``,
``entropy_from_logits``). The trainers' loss methods (``RLOOTrainer._compute_loss``, ``GRPOTrainer._compute_loss``,
``DPOTrainer._compute_loss``) are also called directly, unbound, on a ``SimpleNamespace`` standing in for ``self``:
the model forward is replaced by a stub that returns our per-token log-probs, so TRL's own loss arithmetic runs on
them. Only what lives inline in a training step (RLOO's advantage computation, OnlineDPOTrainer.training_step) is
restated here in a few lines, with the file and line it comes from.

Tolerances (loss and gradient): float64 inputs agree to 1e-12 (rtol and atol), float32 to 1e-6, except
normalised RLOO advantages (~2e-8 relative, from TRL's float32 Bessel factor; see _NORM_RTOL).
Importing TRL takes about 10 s, hence a separate file.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

PINNED_TRL = "1.16.0"  # pyproject's test extra pins it; the stubs below mirror its private trainer attributes
# Every TRL internal this file calls, as "module:attribute.path".
TRL_INTERNALS = (
    "trl.trainer.utils:selective_log_softmax", "trl.trainer.utils:entropy_from_logits", "trl.trainer.utils:nanstd",
    "trl.trainer.rloo_trainer:RLOOTrainer._compute_loss", "trl.trainer.grpo_trainer:GRPOTrainer._compute_loss",
    "trl.trainer.dpo_trainer:DPOTrainer._compute_loss",
)


def missing_internals(paths):
    """The entries of ``paths`` that do not resolve, each with why (an import error or a missing attribute)."""
    import importlib

    missing = []
    for path in paths:
        module, _, attrs = path.partition(":")
        try:
            obj = importlib.import_module(module)
            for attr in attrs.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as err:
            missing.append(f"{path} ({type(err).__name__}: {err})")
    return missing


trl = pytest.importorskip("trl")
if trl.__version__ != PINNED_TRL:  # another version: these tests say nothing about it, one way or the other
    pytest.skip(f"golden tests are pinned to trl {PINNED_TRL}, found {trl.__version__}", allow_module_level=True)
# The pinned version is installed: from here on a moved internal is a failure, never a skip.
if _missing := missing_internals(TRL_INTERNALS):
    pytest.fail(f"trl {PINNED_TRL} is installed but internals the golden tests call are gone: {_missing}",
                pytrace=False)

from trl.trainer import utils as trl_utils  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

from eva_ray.losses import (  # noqa: E402
    dpo_loss,
    entropy_from_logits,
    oaif_loss,
    rloo_advantages,
    rloo_loss,
    sequence_logprobs,
    token_logprobs,
)

NAN = float("nan")
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}  # used as both rtol and atol
# TRL's nanstd computes its Bessel factor count / (count - 1) from integer counts, which gives a float32 factor even
# for float64 data (trl/trainer/utils.py:1041): normalised advantages then agree to ~2e-8 relative, not 1e-12.
_NORM_RTOL = 1e-7


class _OneProcessAccelerator:
    """The accelerate calls TRL's loss methods make, for a single process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _stub_self(per_token_logps: torch.Tensor, **attrs) -> SimpleNamespace:
    """A stand-in ``self`` whose model forward returns ``per_token_logps`` (and zero entropies)."""

    def get_logps(*args, **kwargs):
        return per_token_logps, torch.zeros_like(per_token_logps), None

    return SimpleNamespace(
        _get_per_token_logps_and_entropies=get_logps,
        model=SimpleNamespace(training=True),
        accelerator=_OneProcessAccelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        **attrs,
    )


def _batch(p: int, n: int, t: int, dtype, seed: int = 0, nan_rewards: bool = True):
    g = torch.Generator().manual_seed(seed)
    b = p * n
    logprobs = (-torch.rand(b, t, generator=g, dtype=dtype) * 2).requires_grad_()
    ref = logprobs.detach() + 0.1 * torch.randn(b, t, generator=g, dtype=dtype)
    old = logprobs.detach() + 0.05 * torch.randn(b, t, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(p, n, generator=g, dtype=dtype)
    if nan_rewards:
        rewards[0, 1] = NAN  # an unscorable response
        rewards[1, 1:] = NAN  # a prompt with a single scorable response
    return logprobs, ref, old, mask, rewards


def _completion_inputs(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    b, t = mask.shape
    return {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
    }


def _trl_rloo_advantages(rewards, old, ref, mask, beta, normalize):
    """TRL 1.16 trl/trainer/rloo_trainer.py:1662-1699 (``_generate_and_score_completions``), restated on tensors.

    ``rewards`` is [P, N] (NaN = unscorable); TRL holds it flat, grouped per prompt contiguously like ours.
    """
    num_generations = rewards.shape[1]
    rewards = rewards.reshape(-1)
    if beta != 0.0:
        per_token_kl = old - ref  # k1 on the sampling policy's log-probs (L1669)
        kl = (per_token_kl * mask).sum(-1)
        rewards = rewards - beta * kl  # L1673
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)  # L1688
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_utils.nanstd(advantages) + 1e-4)  # L1696
    return torch.nan_to_num(advantages, nan=0.0)  # L1699


# ---------------------------------------------------------------------------------------------------------------
# log-probs and entropy: TRL functions called directly
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_token_logprobs_and_entropy_match_trl(dtype, temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 50, generator=g, dtype=dtype)
    labels = torch.randint(0, 50, (3, 6), generator=g)
    expected = trl_utils.selective_log_softmax(logits, labels, temperature=temperature)
    got = token_logprobs(logits, labels, temperature)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(
        entropy_from_logits(logits, temperature), trl_utils.entropy_from_logits(logits / temperature),
        rtol=TOL[dtype], atol=10 * TOL[dtype],
    )


# ---------------------------------------------------------------------------------------------------------------
# RLOO: TRL's RLOOTrainer (sequence-level, k1 KL in the reward, clipped sequence ratio)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(normalize):
    _, _, _, _, rewards = _batch(5, 4, 3, torch.float64, seed=2)
    zeros = torch.zeros(20, 3, dtype=torch.float64)
    expected = _trl_rloo_advantages(rewards, zeros, zeros, zeros, beta=0.0, normalize=normalize)
    got = rloo_advantages(rewards, normalize=normalize).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=_NORM_RTOL if normalize else 0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("clip_eps", [(0.2, 0.2), (0.02, 0.03)])  # the second one does clip some sequences
def test_rloo_loss_matches_trl_rloo_trainer(dtype, normalize, clip_eps):
    """Our kl_mode="reward", kl_estimator="k1", aggregation="sequence" with old_logprobs is TRL's RLOOTrainer."""
    p, n, t, beta = 4, 4, 7, 0.05
    logprobs, ref, old, mask, rewards = _batch(p, n, t, dtype, seed=3)

    advantages = _trl_rloo_advantages(rewards, old, ref, mask, beta, normalize)
    stub = _stub_self(logprobs, epsilon_low=clip_eps[0], epsilon_high=clip_eps[1])
    inputs = _completion_inputs(mask) | {"old_logps": (old * mask).sum(1), "advantages": advantages}
    trl_loss = RLOOTrainer._compute_loss(stub, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logprobs)

    loss, stats = rloo_loss(
        logprobs, ref, mask, rewards, beta=beta, kl_estimator="k1", kl_mode="reward", aggregation="sequence",
        old_logprobs=old, clip_eps=clip_eps, normalize_advantages=normalize,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    rtol = max(TOL[dtype], _NORM_RTOL) if normalize else TOL[dtype]
    torch.testing.assert_close(loss, trl_loss, rtol=rtol, atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=rtol, atol=TOL[dtype])
    clip_region = stub._metrics["train"]["clip_ratio/region_mean"][-1]
    assert stats["clip_fraction"].item() == pytest.approx(clip_region)
    if clip_eps[0] < 0.1:
        assert clip_region > 0  # the comparison did exercise clipping


def test_rloo_on_policy_gradient_matches_trl():
    """TRL always forms the ratio (num_iterations=1: old = current, detached); our plain REINFORCE has its gradient."""
    logprobs, ref, _, mask, rewards = _batch(3, 4, 5, torch.float64, seed=4)
    beta = 0.1
    current = logprobs.detach()
    advantages = _trl_rloo_advantages(rewards, current, ref, mask, beta, normalize=False)
    stub = _stub_self(logprobs, epsilon_low=0.2, epsilon_high=0.2)
    inputs = _completion_inputs(mask) | {"old_logps": (current * mask).sum(1), "advantages": advantages}
    (trl_grad,) = torch.autograd.grad(RLOOTrainer._compute_loss(stub, None, inputs), logprobs)
    loss, _ = rloo_loss(logprobs, ref, mask, rewards, beta=beta)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, trl_grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Token aggregation with k3 in the loss: TRL's GRPOTrainer loss with loss_type="bnpo", fed RLOO advantages
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_k3_loss_matches_trl_grpo_bnpo(dtype):
    """aggregation="token", kl_mode="loss", kl_estimator="k3" is GRPO's "bnpo" loss (per-token clipped surrogate
    plus beta * k3, averaged over every valid token of the batch; grpo_trainer.py:3083-3160), given the same
    advantages. GRPO would normalise advantages per group; the loss itself does not care, so RLOO's are fed in."""
    p, n, t, beta, eps = 3, 4, 6, 0.04, (0.05, 0.08)
    logprobs, ref, old, mask, rewards = _batch(p, n, t, dtype, seed=5)
    advantages = rloo_advantages(rewards).reshape(-1)
    stub = _stub_self(
        logprobs, beta=beta, epsilon_low=eps[0], epsilon_high=eps[1], loss_type="bnpo",
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )
    inputs = _completion_inputs(mask) | {
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
    }
    trl_loss = GRPOTrainer._compute_loss(stub, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logprobs)

    loss, stats = rloo_loss(
        logprobs, ref, mask, rewards, beta=beta, kl_estimator="k3", kl_mode="loss", aggregation="token",
        old_logprobs=old, clip_eps=eps,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(loss, trl_loss, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])
    assert stats["kl"].item() == pytest.approx(stub._metrics["train"]["kl"][-1], rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][-1])


# ---------------------------------------------------------------------------------------------------------------
# DPO / IPO: TRL's DPOTrainer loss, and OnlineDPOTrainer's inline loss
# ---------------------------------------------------------------------------------------------------------------


def _trl_dpo(per_token_lp, mask, ref_chosen, ref_rejected, *, beta, loss_type, label_smoothing=0.0):
    """Run DPOTrainer._compute_loss on per-token log-probs [2P, L] (chosen rows first) via a stub model."""
    two_p, length = per_token_lp.shape

    def model(**kwargs):
        zeros = torch.zeros(two_p, length, dtype=per_token_lp.dtype)
        return SimpleNamespace(
            log_probs=per_token_lp * mask, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcessAccelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )
    # TRL's completion_mask covers input_ids, one longer than the shifted log-probs; its first column is prompt.
    completion_mask = torch.cat([torch.zeros(two_p, 1, dtype=mask.dtype), mask], dim=1)
    inputs = {
        "input_ids": torch.zeros(two_p, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(two_p, length + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False), stub._metrics["train"]


def _pairs(p, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    per_token = (-torch.rand(2 * p, t, generator=g, dtype=dtype) * 2).requires_grad_()
    lengths = torch.randint(1, t + 1, (2 * p,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ref_token = per_token.detach() + 0.3 * torch.randn(2 * p, t, generator=g, dtype=dtype)
    return per_token, mask, ref_token


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_sigmoid_matches_trl_dpo_trainer(dtype):
    p, beta = 5, 0.1
    per_token, mask, ref_token = _pairs(p, 6, dtype, seed=6)
    ref_seq = sequence_logprobs(ref_token, mask)
    trl_loss, metrics = _trl_dpo(per_token, mask, ref_seq[:p], ref_seq[p:], beta=beta, loss_type="sigmoid")
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    seq = sequence_logprobs(per_token, mask)
    loss, stats = dpo_loss(seq[:p], seq[p:], ref_seq[:p], ref_seq[p:], beta=beta)
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])
    for ours, theirs in [
        ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
        ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies"),
    ]:
        assert stats[ours].item() == pytest.approx(metrics[theirs][-1], abs=1e-6), ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ipo_length_normalised_matches_trl_dpo_trainer(dtype):
    """TRL's DPOTrainer IPO divides each log-ratio by the completion length (dpo_trainer.py:1393-1404); our dpo_loss
    gets the same numbers when handed mean per-token log-probs, which is what oaif_loss(length_normalize=True) does.
    """
    p, beta = 5, 0.1
    per_token, mask, ref_token = _pairs(p, 6, dtype, seed=7)
    ref_seq = sequence_logprobs(ref_token, mask)  # TRL's precomputed reference log-probs are sums
    trl_loss, _ = _trl_dpo(per_token, mask, ref_seq[:p], ref_seq[p:], beta=beta, loss_type="ipo")
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    lengths = mask.sum(-1).to(dtype)
    seq_mean = sequence_logprobs(per_token, mask) / lengths
    ref_mean = ref_seq / lengths
    loss, _ = dpo_loss(seq_mean[:p], seq_mean[p:], ref_mean[:p], ref_mean[p:], beta=beta, loss_type="ipo")
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])


def test_label_smoothing_matches_trl_conservative_form():
    """TRL 1.16's "sigmoid" ignores label_smoothing; its conservative-DPO expression survives in the "aot" loss
    (dpo_trainer.py:1447-1456), which first sorts the policy and reference log-ratios across the batch. On pairs
    whose policy and reference log-ratios are already in the same ascending order the sort is the identity, and
    "aot" is exactly -(1 - eps) log s(beta h) - eps log s(-beta h) per pair, i.e. our sigmoid with label_smoothing.
    """
    p, beta, eps = 6, 0.2, 0.15
    per_token, mask, _ = _pairs(p, 5, torch.float64, seed=8)
    seq = sequence_logprobs(per_token, mask).detach()
    order = torch.argsort(seq[:p] - seq[p:])  # put the pairs in ascending policy log-ratio order
    per_token = torch.cat([per_token.detach()[:p][order], per_token.detach()[p:][order]]).requires_grad_()
    mask = torch.cat([mask[:p][order], mask[p:][order]])
    seq = sequence_logprobs(per_token, mask)
    g = torch.Generator().manual_seed(9)
    ref_chosen = -torch.rand(p, generator=g, dtype=torch.float64) * 5
    ref_rejected = ref_chosen - torch.sort(torch.randn(p, generator=g, dtype=torch.float64)).values

    trl_loss, _ = _trl_dpo(per_token, mask, ref_chosen, ref_rejected, beta=beta, loss_type="aot", label_smoothing=eps)
    loss, _ = dpo_loss(seq[:p], seq[p:], ref_chosen, ref_rejected, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(loss, per_token)[0], torch.autograd.grad(trl_loss, per_token)[0], rtol=0, atol=1e-12
    )


def _trl_online_dpo(logprobs, ref_logprobs, completion_mask, rewards, *, beta, loss_type):
    """trl/experimental/online_dpo/online_dpo_trainer.py:1221-1254 (training_step), restated on tensors.

    TRL generates 2 completions per prompt and lays them out as [all first samples; all second samples].
    """
    batch_size = rewards.shape[0] // 2
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    cr_indices = torch.cat((chosen_indices, rejected_indices), dim=0)
    cr_logprobs = logprobs[cr_indices]
    cr_ref_logprobs = ref_logprobs[cr_indices]
    cr_padding_mask = (~completion_mask.bool())[cr_indices]
    cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
    chosen_logprobs_sum, rejected_logprobs_sum = torch.split(cr_logprobs_sum, batch_size)
    chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = torch.split(cr_ref_logprobs_sum, batch_size)
    logits = (chosen_logprobs_sum - rejected_logprobs_sum) - (chosen_ref_logprobs_sum - rejected_ref_logprobs_sum)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_oaif_loss_matches_trl_online_dpo(dtype, loss_type):
    """oaif_loss with N = 2 and summed log-probs is TRL's OnlineDPOTrainer loss (no ties in the rewards)."""
    p, n, beta = 6, 2, 0.1
    logprobs, ref, _, mask, rewards = _batch(p, n, 5, dtype, seed=10, nan_rewards=False)
    # ours: prompt-major [p0s0, p0s1, p1s0, ...]; TRL: sample-major [p0s0, p1s0, ..., p0s1, p1s1, ...]
    to_trl = torch.arange(p * n).view(p, n).t().reshape(-1)
    trl_loss = _trl_online_dpo(
        logprobs[to_trl], ref[to_trl], mask[to_trl], rewards.reshape(-1)[to_trl], beta=beta, loss_type=loss_type
    )
    loss, stats = oaif_loss(logprobs, ref, mask, rewards, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(loss, trl_loss, rtol=TOL[dtype], atol=TOL[dtype])
    grad, trl_grad = torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(trl_loss, logprobs)[0]
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])
    assert stats["n_pairs"].item() == p


def test_oaif_tie_is_where_we_differ_from_trl_online_dpo():
    """A tied pair: TRL trains on it (first sample as chosen); we take no step on it (no stated preference)."""
    logprobs, ref, _, mask, _ = _batch(1, 2, 4, torch.float64, seed=11, nan_rewards=False)
    rewards = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    trl_loss = _trl_online_dpo(logprobs, ref, mask, rewards.reshape(-1), beta=0.1, loss_type="sigmoid")
    loss, stats = oaif_loss(logprobs, ref, mask, rewards, beta=0.1)
    assert trl_loss.item() > 0 and loss.item() == 0.0 and stats["n_pairs"].item() == 0


def test_a_moved_trl_internal_is_named_not_skipped():
    assert missing_internals(TRL_INTERNALS) == []
    gone = missing_internals(["trl.trainer.utils:no_such_helper", "trl.no_such_module:x",
                              "trl.trainer.rloo_trainer:RLOOTrainer._no_such_method"])
    assert [g.split(" ")[0] for g in gone] == ["trl.trainer.utils:no_such_helper", "trl.no_such_module:x",
                                               "trl.trainer.rloo_trainer:RLOOTrainer._no_such_method"]
    assert "AttributeError" in gone[0] and "ModuleNotFoundError" in gone[1]
