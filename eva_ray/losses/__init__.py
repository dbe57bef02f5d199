"""Solver losses: RLOO (REINFORCE leave-one-out) and OAIF (online DPO / IPO), registered as specs.

The registry (:mod:`eva_ray.losses.registry`) says what the learner, driver, planner and config need to know about
each loss; the learner picks one by ``solver.algorithm``::

    spec = get_loss(cfg.solver.algorithm)                  # a LossSpec: its function, view, unit, reference use
    loss, stats = spec.loss_fn(logprobs, ref_logprobs, mask, rewards, beta=cfg.solver.beta,
                               **spec.options_for(cfg.solver))

Adding a loss: write its function in a new module here (the call shape is in :mod:`eva_ray.losses.registry`) and
add one ``register_loss(LossSpec(...))`` line below. Importing this package does not import torch (the config reads
the registry); the tensor functions below are imported from their modules on first use.
"""

from __future__ import annotations

import importlib
from operator import attrgetter
from typing import Any

from eva_ray.losses.registry import (LOSSES, TARGETS, UNITS, VIEWS, LossSpec, TrainingDefaults, get_loss,
                                     register_loss)

register_loss(LossSpec("rloo", "eva_ray.losses.rloo:rloo_loss", view="groups", unit=attrgetter("aggregation"),
                       reference="kl", ratio=True, importance_weights=True,
                       options={"kl_estimator": "kl_estimator", "kl_mode": "kl_mode", "aggregation": "aggregation"}))
register_loss(LossSpec("oaif", "eva_ray.losses.dpo:oaif_loss", view="pairs", unit="group", reference="always",
                       beta_positive=True, options={"loss_type": "dpo_loss"}))

# The tensor functions, by the module that holds them (imported when first asked for, so torch loads only then).
_LAZY: dict[str, str] = {
    "DPO_LOSS_TYPES": "choices", "dpo_loss": "dpo", "oaif_loss": "dpo", "select_preference_pairs": "dpo",
    "AGGREGATIONS": "choices", "KL_MODES": "choices", "rloo_advantages": "rloo", "rloo_loss": "rloo",
    "KL_ESTIMATORS": "logprobs", "entropy_from_logits": "logprobs", "kl_estimate": "logprobs",
    "masked_mean": "logprobs", "masked_sum": "logprobs", "safe_mean": "logprobs", "sequence_logprobs": "logprobs",
    "token_logprobs": "logprobs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["LOSSES", "TARGETS", "UNITS", "VIEWS", "LossSpec", "TrainingDefaults", "get_loss", "register_loss", *_LAZY]
