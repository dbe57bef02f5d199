"""Solver losses: RLOO (REINFORCE leave-one-out), OAIF (online DPO / IPO), and offline DPO, SPPO, SimPO and ORPO,
registered as specs.

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

# The offline losses of eva's Table 2, each with the paper's recipe (appendix "Hyperparameter settings"). Offline,
# beta is offline.beta when set; for ORPO it is lambda. DPO is OAIF's function with the sigmoid loss on summed
# log-probs; SPPO's rewards are win probabilities, which only the offline loop estimates.
register_loss(LossSpec("dpo", "eva_ray.losses.dpo:oaif_loss", view="pairs", unit="group", reference="always",
                       beta_positive=True,
                       defaults=TrainingDefaults(beta=0.05, lr=5e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=2,
                                                 batch_size=8, max_length=2048, max_prompt_length=1024,
                                                 optimizer="adamw")))
register_loss(LossSpec("sppo", "eva_ray.losses.preference:sppo_loss", view="pairs", unit="group",
                       reference="always", beta_positive=True, targets="win_probs",
                       defaults=TrainingDefaults(beta=0.001, lr=5e-7, lr_schedule="linear", warmup_ratio=0.1,
                                                 epochs=6, batch_size=8, max_length=1024, max_prompt_length=512,
                                                 optimizer="rmsprop")))
register_loss(LossSpec("simpo", "eva_ray.losses.preference:simpo_loss", view="pairs", unit="group",
                       reference="never", beta_positive=True, options={"simpo_gamma": "simpo_gamma"},
                       defaults=TrainingDefaults(beta=10.0, lr=8e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=1,
                                                 batch_size=32, max_length=2048, max_prompt_length=1024,
                                                 optimizer="adamw", options={"simpo_gamma": 5.0})))
register_loss(LossSpec("orpo", "eva_ray.losses.preference:orpo_loss", view="pairs", unit="group",
                       reference="never", beta_positive=True,
                       defaults=TrainingDefaults(beta=0.5, lr=5e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=1,
                                                 batch_size=8, max_length=2048, max_prompt_length=1024,
                                                 optimizer="adamw")))

# The tensor functions, by the module that holds them (imported when first asked for, so torch loads only then).
_LAZY: dict[str, str] = {
    "DPO_LOSS_TYPES": "choices", "dpo_loss": "dpo", "oaif_loss": "dpo", "select_preference_pairs": "dpo",
    "PairRows": "dpo", "pair_rows": "dpo",
    "check_win_probs": "preference", "log1mexp": "preference", "orpo_loss": "preference",
    "simpo_loss": "preference", "sppo_loss": "preference",
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
