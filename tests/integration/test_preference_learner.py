"""The offline preference losses and RMSprop in a real learner (DeepSpeed on CPU, the tiny Llama): a few updates on
the same preference pairs lower the loss and widen the chosen-over-rejected log-prob margin.

The batches are laid out as the offline loop lays them out: one group of two per preference pair, chosen first.
"""

from __future__ import annotations

import pytest
import torch

from eva_ray.batching import collate
from tests.integration.test_learner import P, groups, make_learner, policy_path  # noqa: F401

pytestmark = pytest.mark.slow


def _pairs_batch(rollout_groups, targets):
    """The first two responses of every prompt as a (chosen, rejected) pair with ``targets`` [P, 2]."""
    return collate([g[:2] for g in rollout_groups], targets, pad_token_id=0)


def _margin(learner, batch, per_token: bool) -> float:
    """Mean chosen-minus-rejected log-prob over the pairs: summed, or per token (what SimPO and ORPO compare)."""
    seq = torch.tensor(learner.sequence_logprobs(batch))
    if per_token:
        seq = seq / batch.response_token_mask.sum(dim=1)
    return (seq[0::2] - seq[1::2]).mean().item()


@pytest.mark.parametrize("name, beta, lr, targets", [
    ("dpo", 0.1, 1e-3, (1.0, 0.0)),
    # Soft win probabilities, as the offline loop estimates them: targets of +-3 in summed log-ratio, which a
    # smaller step approaches without overshooting (at 1e-3 Adam's first steps jump far past them).
    ("sppo", 0.1, 1e-4, (0.8, 0.2)),
    ("simpo", 2.0, 1e-3, (1.0, 0.0)),
    ("orpo", 0.5, 1e-3, (1.0, 0.0)),
])
def test_a_few_updates_lower_the_loss_and_widen_the_margin(policy_path, groups, name, beta, lr, targets):  # noqa: F811
    batch = _pairs_batch(groups, torch.tensor([targets] * P))
    learner = make_learner(policy_path, stage=0, algorithm=name, beta=beta, lr=lr, micro=8, simpo_gamma=0.5)
    try:
        # SimPO and ORPO never read a reference: none is loaded.
        assert (learner.reference is None) == (name in ("simpo", "orpo"))
        per_token = name in ("simpo", "orpo")
        before = _margin(learner, batch, per_token)
        metrics = [learner.train_step(batch) for _ in range(4)]
        after = _margin(learner, batch, per_token)
    finally:
        learner.close()
    losses = [m["train/loss"] for m in metrics]
    assert all(m["train/skipped"] == 0 and m["train/n_pairs"] == P for m in metrics)
    assert losses[-1] < losses[0], losses
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("stage", [0, 2])
def test_learner_optimizer_rmsprop_steps_with_rmsprop(policy_path, groups, stage):  # noqa: F811
    batch = _pairs_batch(groups, torch.tensor([(0.8, 0.2)] * P))
    learner = make_learner(policy_path, stage=stage, algorithm="sppo", beta=0.1, optimizer="rmsprop")
    try:
        _, before = learner.get_weights()
        metrics = learner.train_step(batch)
        _, after = learner.get_weights()
        optimizer = learner._client_optimizer
        states = list(optimizer.state.values())
    finally:
        learner.close()
    assert isinstance(optimizer, torch.optim.RMSprop) and metrics["train/skipped"] == 0
    # RMSprop's running square of the gradient, and none of Adam's moments.
    assert states and all("square_avg" in s and "exp_avg" not in s for s in states)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
