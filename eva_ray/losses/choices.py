"""The allowed values of the losses' own options, torch-free: the config offers them without loading torch."""

from __future__ import annotations

KL_ESTIMATOR_NAMES: tuple[str, ...] = ("k1", "k2", "k3")
"""Per-token KL estimators (Schulman 2020); the functions are ``eva_ray.losses.logprobs.KL_ESTIMATORS``."""
KL_MODES: tuple[str, ...] = ("reward", "loss")
"""RLOO: where the KL goes, into the reward or into the loss."""
AGGREGATIONS: tuple[str, ...] = ("sequence", "token")
"""RLOO: how the policy term is reduced."""
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")
"""OAIF: DPO's sigmoid loss or IPO's squared one."""
CORRECTIONS: tuple[str, ...] = ("none", "tis", "icepop")
"""Off-policy corrections of lagging rollouts (``eva_ray.losses.off_policy``)."""
