"""Fixtures shared by unit tests."""

from __future__ import annotations

import pytest

from eva_ray.losses import LOSSES, LossSpec, TrainingDefaults, register_loss

# The paper's DPO recipe (appendix A, "Hyperparameter settings").
PAPER_DPO = TrainingDefaults(beta=0.05, lr=5e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=2, batch_size=8,
                             max_length=2048, max_prompt_length=1024, optimizer="adamw")


@pytest.fixture
def offline_losses():
    """Loss specs with published offline recipes, for tests of what reads a spec (the config, the recipe, the plan),
    not of the losses themselves.

    ``dpo`` is the registry's own when it has one; otherwise a stand-in with the paper's DPO recipe is registered for
    the test (the loss function is OAIF's: the same DPO loss on pairs). ``test_simpo`` (no reference, SimPO's
    recipe and its gamma option) and ``test_sppo`` (RMSprop, SPPO's shorter sequences) exist only in tests.
    """
    fn = "eva_ray.losses.dpo:oaif_loss"
    specs = [
        LossSpec("dpo", fn, view="pairs", unit="group", reference="always", beta_positive=True, defaults=PAPER_DPO),
        LossSpec("test_simpo", fn, view="pairs", unit="group", reference="never", beta_positive=True,
                 defaults=TrainingDefaults(beta=10.0, lr=8e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=1,
                                           batch_size=32, max_length=2048, max_prompt_length=1024, optimizer="adamw",
                                           options={"simpo_gamma": 5.0})),
        LossSpec("test_sppo", fn, view="pairs", unit="group", reference="always", beta_positive=True,
                 defaults=TrainingDefaults(beta=0.001, lr=5e-7, lr_schedule="linear", warmup_ratio=0.1, epochs=6,
                                           batch_size=8, max_length=1024, max_prompt_length=512, optimizer="rmsprop")),
    ]
    added = [register_loss(spec).name for spec in specs if spec.name not in LOSSES]
    yield {name: LOSSES[name] for name in ("dpo", "test_simpo", "test_sppo")}
    for name in added:
        del LOSSES[name]
