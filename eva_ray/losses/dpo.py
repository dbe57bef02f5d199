"""OAIF: online DPO on preference pairs built from the solver's own samples.

Online AI Feedback (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792)
samples responses from the current policy, lets a reward model (or judge) rank them, and takes a DPO step on the
best-vs-worst pair of each prompt. eva (arXiv 2411.00062) uses it as one of its two solver losses.

DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7):

    L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
arXiv 2310.12036, eq. 17, with tau = beta):

    L = (h - 1 / (2 * beta))^2,   h = the same log-ratio difference.

Layout as in :mod:`eva_ray.losses.rloo`: B = P * N responses grouped per prompt contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eva_ray.losses.choices import DPO_LOSS_TYPES
from eva_ray.losses.logprobs import check_grouped_shapes, masked_mean, safe_mean, sequence_logprobs

__all__ = ["DPO_LOSS_TYPES", "PairRows", "dpo_loss", "oaif_loss", "pair_rows", "select_preference_pairs"]

def select_preference_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best-vs-worst pair per prompt: chosen = argmax reward, rejected = argmin reward among the N samples.

    Non-finite rewards (NaN, +-inf) are ignored. A prompt has no pair (``valid`` False) when it has fewer than two
    finite rewards (this includes ``N < 2``) or when all its finite rewards are equal: a tie states no preference,
    and training on an arbitrary order would push the policy in a random direction. (TRL's OnlineDPOTrainer, N = 2,
    breaks a tie in favour of the first sample and trains on it anyway.) Among equal maxima / minima the first index
    wins, so the choice is deterministic.

    Args:
        rewards: ``[P, N]``.

    Returns:
        ``(chosen_idx [P] long, rejected_idx [P] long, valid [P] bool)``. Indices are within each prompt's group
        (``0 <= idx < N``; the row in a ``[B, ...]`` tensor is ``p * N + idx``) and are meaningless where not
        ``valid``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, N], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    finite = torch.isfinite(rewards)
    for_max = rewards.masked_fill(~finite, float("-inf"))
    for_min = rewards.masked_fill(~finite, float("inf"))
    best, chosen = for_max.max(dim=1)
    worst, rejected = for_min.min(dim=1)
    valid = (finite.sum(dim=1) >= 2) & (best > worst)
    return chosen, rejected, valid


@dataclass(frozen=True)
class PairRows:
    """The best-vs-worst pair of every prompt that has one, as rows of the ``[B, ...]`` tensors (``B = P * N``)."""

    chosen: torch.Tensor
    """``[P']`` long: the row of each kept pair's chosen response."""
    rejected: torch.Tensor
    """``[P']`` long: the row of its rejected response."""
    valid: torch.Tensor
    """``[P]`` bool: which prompts yielded a pair (:func:`select_preference_pairs`)."""

    def stats(self, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pair_fraction`` (prompts that yielded a pair) and ``score_margin`` (mean reward gap over the pairs)."""
        flat = rewards.detach().reshape(-1)
        return {"pair_fraction": safe_mean(self.valid.float()),
                "score_margin": safe_mean((flat[self.chosen] - flat[self.rejected]).float())}


def pair_rows(rewards: torch.Tensor) -> PairRows:
    """:func:`select_preference_pairs` on ``rewards [P, N]``, turned into row indices of the grouped batch."""
    chosen, rejected, valid = select_preference_pairs(rewards)
    offset = torch.arange(rewards.shape[0], device=chosen.device) * rewards.shape[1]
    return PairRows((offset + chosen)[valid], (offset + rejected)[valid], valid)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO / IPO loss on P preference pairs.

    The inputs are whatever sequence log-probabilities the caller chooses: summed over tokens (the DPO paper, and
    TRL's sigmoid loss and OnlineDPOTrainer) or averaged per token. For ``"ipo"``, TRL's DPOTrainer divides each
    log-ratio by the completion length, because the squared loss otherwise grows with length and the target
    ``1 / (2 beta)`` has no fixed scale; pass per-token means (``oaif_loss(length_normalize=True)``) to get that
    convention. Nothing here normalises behind the caller's back.

    ``label_smoothing`` (sigmoid only) is the conservative DPO of Mitchell (2023), "A note on DPO with noisy
    preferences": the label is flipped with probability eps, ``L = -(1 - eps) log s(beta h) - eps log s(-beta h)``.

    Args:
        policy_chosen_logps: ``[P]`` log pi(y_w | x), with grad.
        policy_rejected_logps: ``[P]`` log pi(y_l | x), with grad.
        ref_chosen_logps: ``[P]`` log ref(y_w | x) (detached here).
        ref_rejected_logps: ``[P]`` log ref(y_l | x) (detached here).
        beta: > 0; the DPO temperature, IPO's tau.
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        label_smoothing: in ``[0, 0.5)``; sigmoid only.

    Returns:
        ``(loss, stats)``: the mean loss over pairs, and detached 0-dim tensors: ``loss``, ``n_pairs``,
        ``rewards_chosen`` / ``rewards_rejected`` (mean implicit rewards ``beta * (logp - ref_logp)``),
        ``rewards_margin`` (their mean difference), ``rewards_accuracy`` (fraction of pairs with chosen > rejected).
        With P = 0 the loss is a 0 that is still connected to the inputs' graph, so ``backward()`` runs (and gives
        zero gradients) and every stat is 0.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; allowed: {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"all four log-prob tensors must be [P] with the same P, got shapes {sorted(shapes)}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratios - rejected_logratios  # [P]

    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid): stays finite for large |beta * h|.
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)).square()
    # safe_mean: with no pair the loss is 0 * (an empty sum), which keeps the graph connected, rather than NaN.
    loss = safe_mean(losses)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    stats = {
        "loss": loss.detach(),
        "n_pairs": torch.tensor(float(h.numel()), device=h.device),
        "rewards_chosen": safe_mean(chosen_rewards),
        "rewards_rejected": safe_mean(rejected_rewards),
        "rewards_margin": safe_mean(chosen_rewards - rejected_rewards),
        "rewards_accuracy": safe_mean((chosen_rewards > rejected_rewards).float()),
    }
    return loss, stats


def oaif_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """OAIF step on a rollout batch: pick best-vs-worst pairs by reward, then :func:`dpo_loss`.

    Same inputs as :func:`eva_ray.losses.rloo.rloo_loss`, so a learner can switch losses by name. It needs the
    log-probs of all B responses; when N > 2 and memory is tight, call :func:`select_preference_pairs` first, run
    the model on the 2 * P selected responses only, and call :func:`dpo_loss` directly.

    Args:
        logprobs: ``[B, T]`` policy per-token log-probs (with grad).
        ref_logprobs: ``[B, T]`` reference per-token log-probs.
        mask: ``[B, T]`` response-token mask.
        rewards: ``[P, N]``, ``B == P * N``, grouped per prompt contiguously.
        beta, loss_type, label_smoothing: see :func:`dpo_loss`.
        length_normalize: use the mean per-token log-prob of each response instead of the sum (TRL DPOTrainer's
            convention for IPO).

    Returns:
        ``(loss, stats)``: :func:`dpo_loss`'s stats plus ``pair_fraction`` (prompts that yielded a pair) and
        ``score_margin`` (mean reward gap between chosen and rejected over the pairs).
    """
    check_grouped_shapes(logprobs, rewards, mask=mask, ref_logprobs=ref_logprobs)
    pairs = pair_rows(rewards)

    def reduce(token_lp: torch.Tensor) -> torch.Tensor:
        return masked_mean(token_lp, mask, dim=-1) if length_normalize else sequence_logprobs(token_lp, mask)

    seq = reduce(logprobs)
    ref_seq = reduce(ref_logprobs.detach())
    loss, stats = dpo_loss(
        seq[pairs.chosen],
        seq[pairs.rejected],
        ref_seq[pairs.chosen],
        ref_seq[pairs.rejected],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    return loss, stats | pairs.stats(rewards)
