"""Importance weights for rollouts sampled by an older policy than the one being trained.

With rollout overlapped with learning (``run.overlap``), batch t+1 is generated while the learner trains on batch
t, so its responses come from the policy one version behind. The learner then corrects the policy gradient per
token with the ratio ``rho_t = pi_learner(y_t) / mu(y_t)``, where ``mu`` is the rollout engine's own log-prob of the
token as it sampled it (after its temperature and top-p) and ``pi_learner`` the learner's at the weights the update
starts from. Raw ratios have unbounded variance, so they are bounded:

* ``"tis"``, truncated importance sampling: ``w = min(rho, cap)``;
* ``"icepop"``: ``w = rho`` inside ``[low, high]``, 0 outside (a token whose probability moved too far gives no
  gradient at all).

A response sampled by the learner's current version gets weight exactly 1: the correction is for policy lag, not
for the small numeric differences between an inference engine and the trainer at the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eva_ray.losses.choices import CORRECTIONS
from eva_ray.losses.logprobs import masked_mean


@dataclass(frozen=True)
class Correction:
    method: str = "none"
    cap: float = 2.0
    """TIS: the largest weight."""
    low: float = 0.5
    """IcePop: ratios below this give weight 0."""
    high: float = 2.0
    """IcePop: ratios above this give weight 0."""

    def __post_init__(self) -> None:
        if self.method not in CORRECTIONS:
            raise ValueError(f"unknown off-policy correction {self.method!r}; allowed: {list(CORRECTIONS)}")
        if self.cap <= 0 or not 0 <= self.low <= 1 <= self.high:
            raise ValueError(f"off-policy bounds need cap > 0 and low <= 1 <= high; got cap {self.cap}, "
                             f"low {self.low}, high {self.high}")


def importance_weights(learner_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, lagging: torch.Tensor,
                       mask: torch.Tensor, correction: Correction) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``([B, T] weights, stats)`` for the policy-gradient terms of one batch.

    Args:
        learner_logprobs: ``[B, T]`` token log-probs at the weights the update starts from (detached here).
        behaviour_logprobs: ``[B, T]`` the rollout engine's log-probs of the same tokens.
        lagging: ``[B]`` bool, True for responses sampled by an older policy version than the learner's.
        mask: ``[B, T]`` valid response tokens.
        correction: the method and its bounds.

    Stats (detached 0-dim tensors, over valid tokens): ``is_ratio_mean`` (the raw ratio, 1 on responses that do
    not lag), ``is_clipped_fraction`` (tokens whose weight differs from the raw ratio: truncated or dropped) and
    ``is_lagging_fraction`` (of responses).
    """
    mask = mask.bool()
    one = torch.ones_like(learner_logprobs, dtype=torch.float32)
    # Padding can hold anything (even -inf): only valid tokens of lagging responses get a ratio.
    use = mask & lagging.view(-1, 1)
    log_ratio = torch.where(use, learner_logprobs.detach().float() - behaviour_logprobs.float(), 0.0)
    ratio = torch.where(use, log_ratio.exp(), one)
    if correction.method == "tis":
        weights = ratio.clamp(max=correction.cap)
    elif correction.method == "icepop":
        inside = (ratio >= correction.low) & (ratio <= correction.high)
        weights = torch.where(inside, ratio, torch.zeros_like(ratio))
    else:
        weights = one
    weights = torch.where(use, weights, one)  # exactly 1 where nothing lags
    stats = {
        "is_ratio_mean": masked_mean(ratio, mask),
        "is_clipped_fraction": masked_mean((weights != ratio).float(), mask),
        "is_lagging_fraction": lagging.float().mean(),
    }
    return weights, stats
