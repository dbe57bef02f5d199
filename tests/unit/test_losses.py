"""Unit tests for eva_ray.losses: hand-computed values, loop-vs-vectorised references and degenerate inputs.

The comparisons against TRL 1.16 live in test_losses_golden.py (importing TRL costs about 10 s).
"""

from __future__ import annotations

import math

import pytest
import torch

from eva_ray.losses import (
    KL_ESTIMATORS,
    LOSSES,
    LossSpec,
    dpo_loss,
    entropy_from_logits,
    get_loss,
    kl_estimate,
    masked_mean,
    masked_sum,
    oaif_loss,
    rloo_advantages,
    rloo_loss,
    select_preference_pairs,
    sequence_logprobs,
    token_logprobs,
)

NAN = float("nan")
INF = float("inf")


def _batch(p: int = 3, n: int = 4, t: int = 6, seed: int = 0, dtype=torch.float64):
    """Random per-token log-probs [B, T] (leaf with grad), ref, old, a ragged mask and rewards [P, N]."""
    g = torch.Generator().manual_seed(seed)
    b = p * n
    logprobs = (-torch.rand(b, t, generator=g, dtype=dtype) * 3).requires_grad_()
    ref = logprobs.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    old = logprobs.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = torch.randn(p, n, generator=g, dtype=dtype)
    return logprobs, ref, old, mask, rewards


# --------------------------------------------------------------------------------------------------------------
# logprobs.py
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    # chunk_size=4 does not divide B * T = 15: exercises the ragged last chunk.
    got = token_logprobs(logits, labels, temperature, chunk_size=4)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_token_logprobs_ignore_index_gradient_and_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[1, 2:] = -100
    lp = token_logprobs(logits, labels)
    assert (lp[1, 2:] == 0).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1, 2:] == 0).all()
    # bf16 logits are upcast per chunk: float32 output, close to the float64 answer on the same (rounded) logits.
    bf = logits.detach().bfloat16()
    got = token_logprobs(bf, labels)
    ref = token_logprobs(bf.double(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_token_logprobs_errors():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="align"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    for temperature in (1.0, 1.5):
        logp = torch.log_softmax(logits / temperature, -1)
        expected = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(entropy_from_logits(logits, temperature, chunk_size=4), expected)
    # uniform logits: log V
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, INF], [NAN, 4.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert masked_sum(x, mask).item() == 13.0
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([3.0, 10.0]))
    assert masked_mean(x, mask).item() == pytest.approx(13.0 / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 5.0]))
    masked_mean(x, mask).backward()
    assert torch.isfinite(x.grad).all()  # inf / NaN under the mask do not leak into the gradient
    # all-zero mask: 0, not NaN, and a zero gradient
    y = torch.randn(2, 3, requires_grad=True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    out = masked_mean(y, empty)
    out.backward()
    assert out.item() == 0.0 and (y.grad == 0).all()
    assert (masked_mean(y, empty, dim=-1) == 0).all()
    torch.testing.assert_close(sequence_logprobs(x.detach(), mask), torch.tensor([3.0, 10.0]))


def test_kl_estimators_loop_reference():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 4
    formulas = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }
    assert set(formulas) == set(KL_ESTIMATORS)
    for name, f in formulas.items():
        got = kl_estimate(logp, ref, name)
        for i in range(4):
            for t in range(5):
                assert got[i, t].item() == pytest.approx(f(logp[i, t].item(), ref[i, t].item()), abs=1e-12)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # identical policies: every estimator is exactly 0
    for name in KL_ESTIMATORS:
        assert (kl_estimate(logp, logp, name) == 0).all()
    with pytest.raises(ValueError, match=r"allowed: \['k1', 'k2', 'k3'\]"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_unbiased_where_claimed():
    # Sample from a categorical pi; E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly in expectation (Schulman 2020).
    logits_pi, logits_ref = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    lp, lr = torch.log_softmax(logits_pi, 0), torch.log_softmax(logits_ref, 0)
    exact = (lp.exp() * (lp - lr)).sum()
    probs = lp.exp()
    for name in ("k1", "k3"):
        expectation = (probs * kl_estimate(lp, lr, name)).sum()
        torch.testing.assert_close(expectation, exact)


# --------------------------------------------------------------------------------------------------------------
# RLOO advantages
# --------------------------------------------------------------------------------------------------------------


def test_rloo_advantages_hand_computed():
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    # baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5
    torch.testing.assert_close(adv, torch.tensor([[-1.5, 0.0, 1.5]]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([[0.0, 1.0]])), torch.tensor([[-1.0, 1.0]]))
    # integer rewards are accepted
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1, 2, 3]])), torch.tensor([[-1.5, 0.0, 1.5]]))


def test_rloo_advantages_degenerate():
    # N = 1: no sibling, no baseline, all zero
    assert (rloo_advantages(torch.tensor([[3.0], [-1.0]])) == 0).all()
    # equal rewards: zero
    torch.testing.assert_close(rloo_advantages(torch.full((2, 4), 0.1)), torch.zeros(2, 4))
    rewards = torch.tensor(
        [
            [1.0, NAN, 3.0],  # NaN dropped from the baselines: [1, 3] -> [-2, 2]
            [NAN, 5.0, NAN],  # one valid: no baseline
            [NAN, NAN, NAN],  # none valid
            [INF, 1.0, 2.0],  # inf counts as invalid too
        ]
    )
    adv = rloo_advantages(rewards)
    torch.testing.assert_close(
        adv, torch.tensor([[-2.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -1.0, 1.0]])
    )
    assert torch.isfinite(rloo_advantages(rewards, normalize=True)).all()
    assert (rloo_advantages(torch.empty(0, 4)).shape) == (0, 4)
    with pytest.raises(ValueError, match=r"\[P, N\]"):
        rloo_advantages(torch.zeros(4))


def _loop_advantages(rewards: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rewards:
        valid = [j for j, r in enumerate(row) if math.isfinite(r)]
        adv_row = []
        for i, r in enumerate(row):
            if i not in valid or len(valid) < 2:
                adv_row.append(0.0)
            else:
                adv_row.append(r - sum(row[j] for j in valid if j != i) / (len(valid) - 1))
        out.append(adv_row)
    return out


def test_rloo_advantages_loop_vs_vectorized():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(7, 5, generator=g, dtype=torch.float64)
    rewards[torch.rand(7, 5, generator=g) < 0.25] = NAN
    expected = torch.tensor(_loop_advantages(rewards.tolist()), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards), expected, rtol=0, atol=1e-12)
    # normalisation uses the responses with a signal only, and leaves the rest at 0
    normed = rloo_advantages(rewards, normalize=True)
    rows = rewards.tolist()
    signal = torch.tensor([[math.isfinite(r) and sum(map(math.isfinite, row)) >= 2 for r in row] for row in rows])
    vals = normed[signal]
    assert vals.mean().abs().item() < 1e-12
    assert vals.std().item() == pytest.approx(1.0, abs=1e-3)  # std + 1e-4 in the denominator
    assert (normed[~signal] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# RLOO loss
# --------------------------------------------------------------------------------------------------------------


def _loop_rloo_loss(logprobs, ref, mask, rewards, *, beta, est, kl_mode, aggregation, old=None, clip_eps=None):
    """Element-by-element restatement of rloo_loss, written from the formulas rather than from the code."""
    kl_fns = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: torch.exp(b - a) - (b - a) - 1,
    }
    kl = kl_fns[est]
    num_prompts, n = rewards.shape
    b, t = logprobs.shape
    toks = [[j for j in range(t) if mask[i, j]] for i in range(b)]
    behaviour = old if old is not None else logprobs.detach()
    shaped = [[rewards[p, k].item() for k in range(n)] for p in range(num_prompts)]
    if kl_mode == "reward":
        for i in range(b):
            seq_kl = sum(kl(behaviour[i, j], ref[i, j]).item() for j in toks[i])
            shaped[i // n][i % n] -= beta * seq_kl
    adv = [a for row in _loop_advantages(shaped) for a in row]

    def surrogate(lp, old_lp, a):
        if old_lp is None:
            return -a * lp
        ratio = torch.exp(lp - old_lp)
        if clip_eps is None:
            return -a * ratio
        return -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)

    total, count = 0.0, 0
    for i in range(b):
        if aggregation == "sequence":
            lp = sum((logprobs[i, j] for j in toks[i]), torch.zeros((), dtype=logprobs.dtype))
            old_lp = None if old is None else sum(old[i, j] for j in toks[i])
            term = surrogate(lp, old_lp, adv[i])
            if kl_mode == "loss":
                term = term + beta * sum((kl(logprobs[i, j], ref[i, j]) for j in toks[i]), 0.0)
            total, count = total + term, count + 1
        else:
            for j in toks[i]:
                term = surrogate(logprobs[i, j], None if old is None else old[i, j], adv[i])
                if kl_mode == "loss":
                    term = term + beta * kl(logprobs[i, j], ref[i, j])
                total, count = total + term, count + 1
    return total / count


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
@pytest.mark.parametrize("est", ["k1", "k3"])
@pytest.mark.parametrize("ratio", ["none", "ratio", "clip"])
def test_rloo_loss_loop_vs_vectorized(aggregation, kl_mode, est, ratio):
    logprobs, ref, old, mask, rewards = _batch(p=2, n=3, t=4)
    rewards[1, 2] = NAN
    kwargs = dict(beta=0.1, est=est, kl_mode=kl_mode, aggregation=aggregation)
    old_arg = None if ratio == "none" else old
    clip = 0.1 if ratio == "clip" else None  # 0.1 so that some ratios do leave the trust region
    expected = _loop_rloo_loss(logprobs, ref, mask, rewards, old=old_arg, clip_eps=clip, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    loss, stats = rloo_loss(
        logprobs, ref, mask, rewards, beta=0.1, kl_estimator=est, kl_mode=kl_mode, aggregation=aggregation,
        old_logprobs=old_arg, clip_eps=clip,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert stats["loss"].item() == pytest.approx(loss.item())
    assert stats["valid_fraction"].item() == pytest.approx(5 / 6)
    if ratio == "clip" and aggregation == "token":
        assert 0 < stats["clip_fraction"].item() < 1


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
def test_ratio_at_old_equals_reinforce_gradient(aggregation, kl_mode):
    """With old_logprobs = logprobs.detach(), clipped or not, the gradient is plain REINFORCE's."""
    logprobs, ref, _, mask, rewards = _batch(seed=5)
    kw = dict(beta=0.05, kl_estimator="k3", kl_mode=kl_mode, aggregation=aggregation)
    plain, _ = rloo_loss(logprobs, ref, mask, rewards, **kw)
    (g_plain,) = torch.autograd.grad(plain, logprobs)
    for clip in (None, 0.2, (0.2, 0.28)):
        ratio_loss, stats = rloo_loss(logprobs, ref, mask, rewards, old_logprobs=logprobs.detach(), clip_eps=clip, **kw)
        (g_ratio,) = torch.autograd.grad(ratio_loss, logprobs)
        torch.testing.assert_close(g_ratio, g_plain, rtol=0, atol=1e-12)
        assert stats["clip_fraction"].item() == 0.0


def test_hand_computed_sequence_loss():
    # One prompt, two responses of one token each; no KL. A = [-1, 1]; loss = -mean(A_i * logp_i).
    logprobs = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
    loss, stats = rloo_loss(logprobs, None, torch.ones(2, 1), torch.tensor([[0.0, 2.0]]), beta=0.0)
    # A = [0 - 2, 2 - 0] = [-2, 2]; loss = -(-2 * -1 + 2 * -2) / 2 = 1
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[1.0], [-1.0]]))
    assert stats["advantage_mean"].item() == 0.0 and stats["advantage_std"].item() == pytest.approx(2.0)


def test_reward_kl_shapes_reward_before_baseline():
    logprobs, ref, _, mask, rewards = _batch(seed=6)
    beta = 0.3
    seq_kl = masked_sum(logprobs.detach() - ref, mask, dim=-1).view_as(rewards)
    shaped_loss, stats = rloo_loss(logprobs, ref, mask, rewards, beta=beta, kl_mode="reward")
    manual_loss, _ = rloo_loss(logprobs, ref, mask, rewards - beta * seq_kl, beta=0.0)
    torch.testing.assert_close(shaped_loss, manual_loss)
    assert stats["kl_seq"].item() == pytest.approx(seq_kl.mean().item())
    assert stats["kl_loss"].item() == 0.0


def test_reward_kl_uses_sampling_policy_with_old_logprobs():
    """Across several updates on one batch the shaped rewards (hence advantages) must not move with the policy."""
    logprobs, ref, old, mask, rewards = _batch(seed=7)
    kw = dict(beta=0.5, kl_mode="reward", old_logprobs=old)
    _, s1 = rloo_loss(logprobs, ref, mask, rewards, **kw)
    _, s2 = rloo_loss(logprobs + 1.0, ref, mask, rewards, **kw)
    assert s1["reward_shaped_mean"].item() == s2["reward_shaped_mean"].item()
    assert s1["kl"].item() == pytest.approx(masked_mean(old - ref, mask).item())


def test_clipping_blocks_gradient_outside_trust_region():
    logprobs = torch.tensor([[0.0], [0.0]], requires_grad=True)
    old = torch.tensor([[-1.0], [-1.0]])  # ratio e = 2.72, far above 1 + eps
    rewards = torch.tensor([[0.0, 1.0]])  # A = [-1, 1]
    loss, stats = rloo_loss(logprobs, None, torch.ones(2, 1), rewards, beta=0.0, old_logprobs=old, clip_eps=0.2)
    loss.backward()
    # A > 0 and ratio > 1 + eps: clipped, no gradient. A < 0: the unclipped branch is the min, gradient flows.
    assert logprobs.grad[1].item() == 0.0 and logprobs.grad[0].item() != 0.0
    assert stats["clip_fraction"].item() == 0.5


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
def test_rloo_loss_degenerate_inputs_stay_finite(aggregation, kl_mode):
    logprobs, ref, old, mask, _ = _batch(p=4, n=3, seed=8)
    # garbage under the mask, where padding lives
    with torch.no_grad():
        logprobs[~mask] = -INF
    ref = ref.clone()
    ref[~mask] = NAN
    old = old.clone()
    old[~mask] = INF
    mask[0] = False  # an empty response
    rewards = torch.tensor([[NAN, NAN, NAN], [1.0, NAN, NAN], [2.0, 2.0, 2.0], [0.0, 1.0, NAN]], dtype=torch.float64)
    kw = dict(beta=0.1, kl_estimator="k3", kl_mode=kl_mode, aggregation=aggregation)
    for extra in ({}, {"old_logprobs": old, "clip_eps": 0.2}, {"normalize_advantages": True}):
        loss, stats = rloo_loss(logprobs, ref, mask, rewards, **kw, **extra)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), extra
        assert all(torch.isfinite(v).all() for v in stats.values()), stats
    # N = 1: no baseline; only the KL term (loss mode) can move the policy
    lp1, ref1, _, mask1, r1 = _batch(p=3, n=1, seed=9)
    loss, stats = rloo_loss(lp1, ref1, mask1, r1, **kw)
    assert torch.isfinite(loss) and stats["signal_fraction"].item() == 0.0
    # empty batch
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    loss, stats = rloo_loss(empty, empty.detach(), empty.detach().bool(), torch.zeros(0, 2), **kw)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in stats.values())


def test_rloo_loss_float32_bf16_inputs():
    logprobs, ref, old, mask, rewards = _batch(seed=10, dtype=torch.float32)
    loss, stats = rloo_loss(logprobs, ref, mask, rewards.bfloat16(), beta=0.1, aggregation="token")
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(logprobs.grad).all()


def test_rloo_loss_errors():
    logprobs, ref, _, mask, rewards = _batch()
    with pytest.raises(ValueError, match=r"kl_mode 'both'; allowed: \['reward', 'loss'\]"):
        rloo_loss(logprobs, ref, mask, rewards, beta=0.1, kl_mode="both")
    with pytest.raises(ValueError, match=r"aggregation 'x'; allowed: \['sequence', 'token'\]"):
        rloo_loss(logprobs, ref, mask, rewards, beta=0.1, aggregation="x")
    with pytest.raises(ValueError, match="KL estimator"):
        rloo_loss(logprobs, ref, mask, rewards, beta=0.1, kl_estimator="k9")
    with pytest.raises(ValueError, match="B = P \\* N"):
        rloo_loss(logprobs, ref, mask, rewards[:, :2], beta=0.1)
    with pytest.raises(ValueError, match="mask must match"):
        rloo_loss(logprobs, ref, mask[:, :2], rewards, beta=0.1)
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        rloo_loss(logprobs, None, mask, rewards, beta=0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        rloo_loss(logprobs, ref, mask, rewards, beta=0.1, old_logprobs=ref, clip_eps=0.0)


# --------------------------------------------------------------------------------------------------------------
# OAIF / DPO
# --------------------------------------------------------------------------------------------------------------


def test_select_preference_pairs():
    rewards = torch.tensor(
        [
            [0.1, 0.9, 0.5],  # chosen 1, rejected 0
            [NAN, 0.2, 0.7],  # NaN ignored: chosen 2, rejected 1
            [0.3, 0.3, 0.3],  # tie: no preference
            [NAN, 0.4, NAN],  # one finite reward
            [1.0, 1.0, 0.0],  # tied maxima: first index wins
            [-INF, 0.0, 1.0],  # -inf is not a reward
        ]
    )
    chosen, rejected, valid = select_preference_pairs(rewards)
    assert valid.tolist() == [True, True, False, False, True, True]
    assert chosen[valid].tolist() == [1, 2, 0, 2]
    assert rejected[valid].tolist() == [0, 1, 2, 1]
    _, _, valid1 = select_preference_pairs(torch.tensor([[1.0], [2.0]]))  # N = 1
    assert not valid1.any()


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5]), torch.tensor([-1.5])
    beta = 0.5
    h = (-1.0 + 1.5) - (-2.0 + 1.5)  # 1.0
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))))
    assert stats["rewards_chosen"].item() == pytest.approx(0.25)
    assert stats["rewards_rejected"].item() == pytest.approx(-0.25)
    assert stats["rewards_margin"].item() == pytest.approx(0.5)
    assert stats["rewards_accuracy"].item() == 1.0 and stats["n_pairs"].item() == 1
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises chosen, lowers rejected

    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2)

    eps = 0.1
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    assert loss.item() == pytest.approx(expected)


def test_dpo_loss_empty_and_errors():
    empty = torch.zeros(0, requires_grad=True)
    loss, stats = dpo_loss(empty, empty, empty.detach(), empty.detach(), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and stats["n_pairs"].item() == 0
    assert all(torch.isfinite(v) for v in stats.values())
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"allowed: \['sigmoid', 'ipo'\]"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="same P"):
        dpo_loss(x, torch.zeros(3), x, x, beta=0.1)


def test_dpo_loss_large_logits_finite():
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    loss, _ = dpo_loss(big, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_oaif_loss_picks_pairs_and_matches_dpo_loss(length_normalize, loss_type):
    logprobs, ref, _, mask, rewards = _batch(p=4, n=3, seed=11)
    rewards[2] = 1.0  # a tie: no pair from prompt 2
    loss, stats = oaif_loss(
        logprobs, ref, mask, rewards, beta=0.2, loss_type=loss_type, length_normalize=length_normalize
    )
    # loop reference: pick rows by hand and reduce each response by hand
    def reduce(src, i):
        s = src[i][mask[i]].sum()
        return s / mask[i].sum() if length_normalize else s

    pc, pr, rc, rr, margins = [], [], [], [], []
    for p in range(4):
        row = rewards[p].tolist()
        if max(row) == min(row):
            continue
        c, r = 3 * p + row.index(max(row)), 3 * p + row.index(min(row))
        pc.append(reduce(logprobs, c))
        pr.append(reduce(logprobs, r))
        rc.append(reduce(ref, c))
        rr.append(reduce(ref, r))
        margins.append(max(row) - min(row))
    expected, _ = dpo_loss(
        torch.stack(pc), torch.stack(pr), torch.stack(rc), torch.stack(rr), beta=0.2, loss_type=loss_type
    )
    torch.testing.assert_close(loss, expected)
    assert stats["n_pairs"].item() == 3 and stats["pair_fraction"].item() == 0.75
    assert stats["score_margin"].item() == pytest.approx(sum(margins) / 3)
    torch.testing.assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(expected, logprobs)[0])


def test_oaif_loss_no_pairs_backward_ok():
    logprobs, ref, _, mask, _ = _batch(p=2, n=2, seed=12)
    loss, stats = oaif_loss(logprobs, ref, mask, torch.tensor([[1.0, 1.0], [NAN, 2.0]]), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and stats["n_pairs"].item() == 0 and (logprobs.grad == 0).all()


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


def test_policy_loss_registry():
    assert set(LOSSES) == {"rloo", "oaif", "dpo", "sppo", "simpo", "orpo"}
    assert get_loss("rloo").loss_fn is rloo_loss and get_loss("oaif").loss_fn is oaif_loss
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'; allowed: \['dpo', 'oaif', 'orpo', 'rloo', "):
        get_loss("ppo")
    logprobs, ref, _, mask, rewards = _batch()
    for name, spec in LOSSES.items():  # one call shape for all
        # A win-probability loss (SPPO) gets probabilities; the others get the rewards as they are.
        targets = torch.sigmoid(rewards) if spec.targets == "win_probs" else rewards
        loss, stats = spec.loss_fn(logprobs, ref, mask, targets, beta=0.1)
        assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in stats, name


def test_loss_specs_say_what_the_learner_acts_on():
    class Solver:
        aggregation, kl_estimator, kl_mode, dpo_loss = "token", "k3", "loss", "ipo"

    rloo, oaif = get_loss("rloo"), get_loss("oaif")
    # RLOO reads the reference only through its beta-weighted KL; OAIF's DPO term always reads it.
    assert not rloo.needs_reference(0.0) and rloo.needs_reference(0.1) and oaif.needs_reference(0.0)
    assert rloo.check_beta(0.0) is None and "needs beta > 0" in oaif.check_beta(0.0)
    assert rloo.unit_for(Solver()) == "token" and oaif.unit_for(Solver()) == "group"
    assert rloo.options_for(Solver()) == {"kl_estimator": "k3", "kl_mode": "loss", "aggregation": "token"}
    assert oaif.options_for(Solver()) == {"loss_type": "ipo"}
    assert (rloo.view, rloo.ratio, rloo.importance_weights, rloo.needs_spread) == ("groups", True, True, False)
    assert (oaif.view, oaif.ratio, oaif.importance_weights, oaif.needs_spread) == ("pairs", False, False, True)


def test_a_bad_spec_fails_when_registered_not_when_used():
    with pytest.raises(ValueError, match=r"loss 'x': view 'triples'; allowed: groups, pairs"):
        LossSpec("x", rloo_loss, view="triples")
    with pytest.raises(ValueError, match=r"loss 'x': unit 'word'"):
        LossSpec("x", rloo_loss, unit="word")
    with pytest.raises(ValueError, match="already registered"):
        from eva_ray.losses import register_loss

        register_loss(LossSpec("rloo", rloo_loss))
