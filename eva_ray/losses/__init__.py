"""Solver losses: RLOO (REINFORCE leave-one-out) and OAIF (online DPO / IPO), as pure tensor functions.

Both policy losses share one call shape, so the learner picks one by its config name::

    loss_fn = get_policy_loss(cfg.learner.loss)              # "rloo" or "oaif"
    loss, stats = loss_fn(logprobs, ref_logprobs, mask, rewards, beta=cfg.learner.beta, **cfg.learner.loss_kwargs)

with ``logprobs``, ``ref_logprobs``, ``mask`` of shape ``[B, T]`` and ``rewards`` of shape ``[P, N]``, ``B = P * N``,
responses grouped per prompt contiguously. ``stats`` holds detached 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eva_ray.losses.dpo import DPO_LOSS_TYPES, dpo_loss, oaif_loss, select_preference_pairs
from eva_ray.losses.logprobs import (
    KL_ESTIMATORS,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_sum,
    safe_mean,
    sequence_logprobs,
    token_logprobs,
)
from eva_ray.losses.rloo import AGGREGATIONS, KL_MODES, rloo_advantages, rloo_loss

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "rloo": rloo_loss,
    "oaif": oaif_loss,
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered under ``name`` (``"rloo"`` or ``"oaif"``); ValueError names the allowed ones."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; allowed: {sorted(POLICY_LOSSES)}") from None


__all__ = [
    "AGGREGATIONS",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "KL_MODES",
    "POLICY_LOSSES",
    "PolicyLoss",
    "dpo_loss",
    "entropy_from_logits",
    "get_policy_loss",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "oaif_loss",
    "rloo_advantages",
    "rloo_loss",
    "safe_mean",
    "select_preference_pairs",
    "sequence_logprobs",
    "token_logprobs",
]
