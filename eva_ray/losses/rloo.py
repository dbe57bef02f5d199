"""RLOO: REINFORCE with a leave-one-out baseline, the solver's policy-gradient loss.

For each prompt the solver samples N responses with rewards r_1..r_N. Response i is scored against the mean reward
of its N - 1 siblings,

    A_i = r_i - (sum_j r_j - r_i) / (N - 1),

an unbiased baseline because it does not depend on y_i itself (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs", arXiv 2402.14740). eva (arXiv 2411.00062) trains its solver with this loss online.

Layout: B = P * N responses, grouped per prompt *contiguously*: rows ``p * N .. p * N + N - 1`` of every ``[B, T]``
tensor are the N responses to prompt p, in the same order as ``rewards[p]``.
"""

from __future__ import annotations

import torch

from eva_ray.losses.choices import AGGREGATIONS, KL_MODES
from eva_ray.losses.logprobs import (
    KL_ESTIMATORS,
    check_grouped_shapes,
    kl_estimate,
    masked_mean,
    masked_sum,
    safe_mean,
    sequence_logprobs,
)

__all__ = ["AGGREGATIONS", "KL_MODES", "rloo_advantages", "rloo_loss"]


# Added to the standard deviation when advantages are normalised, so a batch of equal advantages gives 0, not NaN.
# Same constant as TRL's RLOOTrainer, so the two agree number for number.
_NORM_EPS = 1e-4


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")


def _leave_one_out(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out advantages and the mask of responses that carry a learning signal.

    Args:
        rewards: ``[P, N]``; non-finite entries (NaN, +-inf) mean "no reward".

    Returns:
        ``(advantages [P, N], has_signal [P, N] bool)``. ``has_signal`` is False for responses without a finite
        reward and for every response of a prompt with fewer than two finite rewards; their advantage is 0.
    """
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = valid.sum(dim=1, keepdim=True)  # [P, 1]
    # Only valid siblings enter a baseline: summing the zero-filled rewards and dividing by (valid count - 1) is the
    # mean over the *other valid* responses. clamp(min=1) keeps a prompt with < 2 valid rewards from dividing by 0;
    # its advantages are masked to 0 below anyway (there is no sibling to compare with, so no baseline exists).
    baseline = (r.sum(dim=1, keepdim=True) - r) / (count - 1).clamp(min=1).to(r.dtype)
    has_signal = valid & (count >= 2)
    return torch.where(has_signal, r - baseline, torch.zeros_like(r)), has_signal


def _normalize(advantages: torch.Tensor, has_signal: torch.Tensor) -> torch.Tensor:
    """Whiten advantages over the whole batch, using only responses that carry a signal; others stay 0."""
    n = has_signal.sum()
    mean = masked_mean(advantages, has_signal)
    var = masked_sum((advantages - mean).square(), has_signal) / (n - 1).clamp(min=1).to(advantages.dtype)
    normed = (advantages - mean) / (var.sqrt() + _NORM_EPS)
    return torch.where(has_signal, normed, torch.zeros_like(normed))


def rloo_advantages(rewards: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """RLOO advantages ``A_i = r_i - mean_{j != i} r_j`` per prompt (Ahmadian et al. 2024, eq. 6; Kool et al. 2019).

    Example: rewards ``[1, 2, 3]`` have baselines ``[2.5, 2, 1.5]`` and advantages ``[-1.5, 0, 1.5]``.

    Degenerate cases, none of which divides by zero or yields NaN:

    * ``N == 1``: no sibling, hence no baseline: every advantage is 0 (the response teaches nothing).
    * A non-finite reward (NaN from a failed reward call, +-inf) marks a response as unscored. The caller should
      normally drop such responses; if it does not, the response gets advantage 0 and is left out of its siblings'
      baselines (they average over the valid siblings only). A prompt with fewer than 2 finite rewards gets all 0.
    * Equal rewards within a prompt give advantages 0 (up to rounding).

    Args:
        rewards: ``[P, N]`` scalar rewards, N responses for each of P prompts.
        normalize: whiten the advantages over the whole batch, ``(A - mean) / (std + 1e-4)``, using only the
            responses that carry a signal for the statistics (as TRL's ``normalize_advantages``).

    Returns:
        ``[P, N]`` advantages, in ``rewards``' floating dtype (float32 for integer rewards).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, N], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    advantages, has_signal = _leave_one_out(rewards)
    return _normalize(advantages, has_signal) if normalize else advantages


def _clip_bounds(clip_eps: float | tuple[float, float]) -> tuple[float, float]:
    low, high = clip_eps if isinstance(clip_eps, tuple) else (clip_eps, clip_eps)
    if not (low > 0 and high > 0):
        raise ValueError(f"clip_eps must be > 0 (or a (low, high) pair of such), got {clip_eps}")
    return 1.0 - low, 1.0 + high


def _surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float | tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element policy-gradient loss and a "was clipped" mask; works on ``[B]`` (sequences) or ``[B, T]`` (tokens).

    Without ``old_logp`` this is plain REINFORCE, ``-A * logp``. With it, the importance-weighted surrogate
    ``-A * pi / pi_old`` and, with ``clip_eps``, PPO's pessimistic clip ``-min(ratio * A, clip(ratio) * A)``
    (Schulman et al. 2017), which bounds how far several updates on one batch can move the policy. At
    ``old_logp == logp.detach()`` the ratio is 1 and ``d ratio = d logp``: the gradient equals REINFORCE's.
    """
    if old_logp is None:
        return -advantages * logp, torch.zeros_like(logp, dtype=torch.bool)
    ratio = torch.exp(logp - old_logp)
    if clip_eps is None:
        return -advantages * ratio, torch.zeros_like(ratio, dtype=torch.bool)
    lo, hi = _clip_bounds(clip_eps)
    objective = torch.min(ratio * advantages, ratio.clamp(lo, hi) * advantages)
    # Clipping is active where the clipped branch wins the min: the ratio left the trust region in the direction
    # the advantage pushes it. Those elements contribute no gradient.
    clipped = ((ratio < lo) & (advantages < 0)) | ((ratio > hi) & (advantages > 0))
    return -objective, clipped


def rloo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
    aggregation: str = "sequence",
    old_logprobs: torch.Tensor | None = None,
    clip_eps: float | tuple[float, float] | None = None,
    normalize_advantages: bool = False,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO policy loss for the KL-regularised objective ``E[r(x, y)] - beta * KL(pi || pi_ref)``.

    Where the KL goes (``kl_mode``):

    * ``"reward"`` (RLOO paper, TRL's RLOOTrainer): the sequence KL ``sum_t k(logp_t, ref_t)`` of the *sampling*
      policy, detached, is subtracted from the reward, ``r' = r - beta * KL``, before the leave-one-out baseline.
      The KL penalty is then just part of the return, so the REINFORCE gradient is an unbiased estimate of the
      gradient of the regularised objective (with ``k1`` exactly the objective's log-ratio term).
    * ``"loss"`` (GRPO-style): ``beta * KL`` is added to the loss as a differentiable penalty, aggregated like the
      policy term. With ``k3`` it is low-variance and always >= 0, but its gradient is that of a per-token KL
      penalty on the sampled tokens, not of the sequence-level objective above: a related, different objective.

    How the policy term is reduced (``aggregation``):

    * ``"sequence"``: REINFORCE on whole responses, ``-mean_i A_i * sum_t logp_it`` (Ahmadian et al. 2024).
      A KL in the loss is then ``beta * mean_i sum_t k_it``, the same scale as in the reward.
    * ``"token"``: every valid token of the batch carries its response's advantage and the per-token loss is
      averaged over all valid tokens in the batch (longer responses weigh more). A KL in the loss is
      ``beta * mean over tokens of k_t``.

    Several updates per batch: pass ``old_logprobs`` (the log-probs of the policy that sampled the batch) and the
    loss uses the ratio ``pi / pi_old`` (per token for ``"token"``, per sequence, ``exp(sum_t (logp - old))``, for
    ``"sequence"``), clipped to ``[1 - eps_low, 1 + eps_high]`` when ``clip_eps`` is set. The reward-side KL is then
    computed from ``old_logprobs`` so the advantages stay fixed across the updates of one batch.

    Args:
        logprobs: ``[B, T]`` per-token log-probs of the responses under the current policy (with grad).
        ref_logprobs: ``[B, T]`` under the frozen reference policy; may be None only when ``beta == 0``.
        mask: ``[B, T]`` response-token mask (bool or 0/1). Masked positions may hold anything, even inf or NaN.
        rewards: ``[P, N]`` with ``B == P * N``, rows grouped per prompt contiguously. Non-finite rewards: see
            :func:`rloo_advantages`.
        beta: KL coefficient (>= 0).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see ``logprobs.KL_ESTIMATORS``).
        kl_mode: ``"reward"`` or ``"loss"``.
        aggregation: ``"sequence"`` or ``"token"``.
        old_logprobs: ``[B, T]`` log-probs of the sampling policy, for importance ratios; None means on-policy.
        clip_eps: ratio clip range, ``eps`` or ``(eps_low, eps_high)``; only used with ``old_logprobs``.
        normalize_advantages: whiten advantages over the batch (see :func:`rloo_advantages`).
        is_weights: ``[B, T]`` per-token importance weights (detached) for responses sampled by an older policy
            (truncated or masked ratios, see :mod:`eva_ray.losses.off_policy`): each token's policy-gradient term
            is multiplied by its weight, in both aggregations (``"sequence"``: ``-A_i * sum_t w_it * logp_it``).
            The KL term is not weighted. None: every weight is 1.

    Returns:
        ``(loss, stats)``: a scalar loss and a dict of detached 0-dim tensors (no device sync; call ``.item()``
        when logging): ``loss``, ``policy_loss``, ``kl_loss`` (the beta-weighted KL term of the loss, 0 in reward
        mode), ``kl`` (mean per-token KL estimate over valid tokens), ``kl_seq`` (mean sequence KL), ``reward_mean``
        (finite raw rewards), ``reward_shaped_mean`` (after the KL shaping), ``advantage_mean``, ``advantage_std``,
        ``clip_fraction`` (of sequences or tokens, per ``aggregation``), ``valid_fraction`` (responses with a
        finite reward), ``signal_fraction`` (responses whose advantage is not forced to 0).
    """
    _check_choice("kl_mode", kl_mode, KL_MODES)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; allowed: {sorted(KL_ESTIMATORS)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    num_prompts, n = check_grouped_shapes(logprobs, rewards, mask=mask, ref_logprobs=ref_logprobs,
                                          old_logprobs=old_logprobs)
    if beta != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta != 0")

    mask = mask.bool()
    # Zero every masked position once, up front. A padded position may hold -inf or NaN; exp() of it (ratio, k3)
    # would be inf, and although a later torch.where drops the value, backward multiplies its zero gradient by inf
    # and produces NaN. Selecting here is linear, so its own backward is clean.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(mask, logprobs, zero)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(mask, ref_logprobs.detach(), zero)
    if old_logprobs is not None:
        old_logprobs = torch.where(mask, old_logprobs.detach(), zero)
    if is_weights is not None:
        if is_weights.shape != logprobs.shape:
            raise ValueError(f"is_weights must be shaped like logprobs {tuple(logprobs.shape)}, "
                             f"got {tuple(is_weights.shape)}")
        is_weights = torch.where(mask, is_weights.detach().to(logprobs.dtype), zero)

    # Rewards and advantages in at least float32 whatever the policy dtype: they are averages of a few numbers.
    reward_dtype = torch.promote_types(rewards.dtype if rewards.is_floating_point() else torch.float32, torch.float32)
    rewards = rewards.detach().to(reward_dtype)

    # The KL in the reward must describe the policy that *sampled* the batch (old_logprobs), not the one being
    # updated: the return of a trajectory is fixed once it is drawn, and so are the advantages across updates.
    behaviour_logprobs = (old_logprobs if old_logprobs is not None else logprobs).detach()
    if ref_logprobs is not None:
        sampled_kl = kl_estimate(behaviour_logprobs, ref_logprobs, kl_estimator)  # [B, T], no grad
    else:
        sampled_kl = torch.zeros_like(behaviour_logprobs)
    seq_kl = masked_sum(sampled_kl, mask, dim=-1)  # [B]

    shaped = rewards
    if kl_mode == "reward" and beta != 0:
        # A NaN reward stays NaN here, so the response stays excluded from the baselines below.
        shaped = rewards - beta * seq_kl.view(num_prompts, n).to(reward_dtype)
    advantages, has_signal = _leave_one_out(shaped)
    if normalize_advantages:
        advantages = _normalize(advantages, has_signal)
    adv = advantages.reshape(-1)  # [B]

    if aggregation == "sequence":
        # Token weights enter the sequence log-prob: its gradient is then sum_t w_t * grad logp_t.
        weigh = (lambda x: x * is_weights) if is_weights is not None else (lambda x: x)
        old_seq = sequence_logprobs(weigh(old_logprobs), mask) if old_logprobs is not None else None
        per_seq, clipped = _surrogate(sequence_logprobs(weigh(logprobs), mask), old_seq, adv, clip_eps)
        policy_loss = safe_mean(per_seq)
        clip_fraction = safe_mean(clipped.float())
    else:
        per_token, clipped = _surrogate(logprobs, old_logprobs, adv.unsqueeze(-1), clip_eps)
        if is_weights is not None:
            per_token = per_token * is_weights
        policy_loss = masked_mean(per_token, mask)
        clip_fraction = masked_mean(clipped.float(), mask)

    kl_loss = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
    token_kl_for_stats = sampled_kl
    if kl_mode == "loss" and beta != 0:
        token_kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)  # differentiable through logprobs
        token_kl_for_stats = token_kl.detach()
        if aggregation == "sequence":
            kl_loss = beta * safe_mean(masked_sum(token_kl, mask, dim=-1))
        else:
            kl_loss = beta * masked_mean(token_kl, mask)
    loss = policy_loss + kl_loss

    finite = torch.isfinite(rewards)
    adv_mean = safe_mean(adv)
    stats = {
        "loss": loss.detach(),
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "kl": masked_mean(token_kl_for_stats, mask),
        "kl_seq": safe_mean(masked_sum(token_kl_for_stats, mask, dim=-1)),
        "reward_mean": masked_mean(rewards, finite),
        "reward_shaped_mean": masked_mean(shaped, finite),
        "advantage_mean": adv_mean,
        "advantage_std": safe_mean((adv - adv_mean).square()).sqrt(),
        "clip_fraction": clip_fraction.detach(),
        "valid_fraction": safe_mean(finite.float()),
        "signal_fraction": safe_mean(has_signal.float()),
    }
    return loss, stats
