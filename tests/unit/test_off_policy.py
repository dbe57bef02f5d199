"""Importance weights for lagging rollouts (eva_ray.losses.off_policy) and how RLOO's loss applies them."""

from __future__ import annotations

import pytest
import torch

from eva_ray.batching import collate, micro_batches, select_pairs
from eva_ray.losses import rloo_loss
from eva_ray.losses.off_policy import Correction, importance_weights
from eva_ray.rollouts import Rollout

B, T = 6, 5


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    learner = -torch.rand(B, T, generator=g) * 3
    behaviour = learner + torch.randn(B, T, generator=g)  # ratios from about e^-2 to e^2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    return learner, behaviour, mask


@pytest.mark.parametrize("method", ["none", "tis", "icepop"])
def test_weights_are_exactly_one_when_nothing_lags(method):
    learner, behaviour, mask = tensors()
    learner[1, 4] = float("-inf")  # padding-like junk must not leak either
    weights, stats = importance_weights(learner, behaviour, torch.zeros(B, dtype=torch.bool), mask,
                                        Correction(method))
    assert torch.equal(weights, torch.ones(B, T))
    assert stats["is_ratio_mean"].item() == 1.0 and stats["is_clipped_fraction"].item() == 0.0
    assert stats["is_lagging_fraction"].item() == 0.0


def test_tis_truncates_and_icepop_drops_the_ratio_outside_its_band():
    learner, behaviour, mask = tensors(1)
    lagging = torch.tensor([True, True, True, False, False, False])
    ratio = (learner - behaviour).exp()
    tis, tis_stats = importance_weights(learner, behaviour, lagging, mask, Correction("tis", cap=1.5))
    ice, ice_stats = importance_weights(learner, behaviour, lagging, mask, Correction("icepop", low=0.5, high=2.0))
    valid = mask & lagging.view(-1, 1)
    assert torch.allclose(tis[valid], ratio[valid].clamp(max=1.5))
    inside = (ratio >= 0.5) & (ratio <= 2.0)
    assert torch.allclose(ice[valid], torch.where(inside, ratio, torch.zeros_like(ratio))[valid])
    rest = ~valid  # responses that do not lag, and padding
    assert torch.equal(tis[rest], torch.ones_like(tis[rest])) and torch.equal(ice[rest], torch.ones_like(ice[rest]))
    assert tis_stats["is_clipped_fraction"].item() == pytest.approx((ratio[valid] > 1.5).sum().item() / mask.sum())
    assert ice_stats["is_clipped_fraction"].item() == pytest.approx((~inside[valid]).sum().item() / mask.sum())
    assert tis_stats["is_lagging_fraction"].item() == 0.5


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="unknown off-policy correction"):
        Correction("ppo")
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        Correction("icepop", low=1.5)


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_rloo_gradient_scales_with_the_weights_and_ones_change_nothing(aggregation):
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    rewards = torch.randn(2, 3, generator=g)
    plain, _ = rloo_loss(logp, None, mask, rewards, beta=0.0, aggregation=aggregation)
    ones, _ = rloo_loss(logp, None, mask, rewards, beta=0.0, aggregation=aggregation,
                        is_weights=torch.ones(B, T))
    assert ones.item() == plain.item()
    (grad_plain,) = torch.autograd.grad(plain, logp)
    weights = torch.rand(B, T, generator=g) * 2
    weighted, _ = rloo_loss(logp, None, mask, rewards, beta=0.0, aggregation=aggregation, is_weights=weights)
    (grad_weighted,) = torch.autograd.grad(weighted, logp)
    assert torch.allclose(grad_weighted, grad_plain * weights, atol=1e-7)
    with pytest.raises(ValueError, match="is_weights must be shaped"):
        rloo_loss(logp, None, mask, rewards, beta=0.0, is_weights=torch.ones(B, T + 1))


def rollouts(with_logprobs: bool = True):
    groups = []
    for p in range(3):
        prompt = list(range(5, 8 + p))
        groups.append([Rollout(f"p{p}", prompt, list(range(10, 12 + p + j)), "", "stop", 0,
                               logprobs=[-0.1 * (k + 1) - p for k in range(2 + p + j)] if with_logprobs else None)
                       for j in range(2)])
    return groups


def test_collate_carries_the_engines_logprobs_through_every_split():
    groups = rollouts()
    batch = collate(groups, torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), pad_token_id=0)
    assert batch.behaviour_logprobs.shape == (6, batch.response_width)
    for i, r in enumerate(r for g in groups for r in g):
        n = len(r.response_token_ids)
        assert batch.behaviour_logprobs[i, :n].tolist() == pytest.approx(r.logprobs)
        assert batch.behaviour_logprobs[i, n:].abs().sum() == 0
    for part in micro_batches(batch, 2) + [batch.select_groups([2, 0]), select_pairs(batch)]:
        assert part.behaviour_logprobs.shape == part.response_ids.shape
        for row in range(part.num_sequences):  # each row's log-probs still belong to its own response
            n = int(part.response_lengths[row])
            source = next(r for g in groups for r in g
                          if r.prompt_id in part.prompt_ids and r.response_token_ids == part.response_ids[row, :n].tolist())
            assert part.behaviour_logprobs[row, :n].tolist() == pytest.approx(source.logprobs)
    assert collate(rollouts(False), torch.zeros(3, 2), pad_token_id=0).behaviour_logprobs is None
