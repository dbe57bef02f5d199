"""The offline preference losses (eva_ray.losses.preference, and DPO's registry entry): each against its paper's
formula computed here by hand, finite-difference gradients, pair selection and bad input.

The comparisons against TRL 1.16 live in test_preference_losses_golden.py (importing TRL costs about 10 s).
"""

from __future__ import annotations

import math

import pytest
import torch

from eva_ray.losses import LOSSES, get_loss, log1mexp, oaif_loss, orpo_loss, simpo_loss, sppo_loss

NAN = float("nan")


def _pairs(p: int = 4, t: int = 6, seed: int = 0, dtype=torch.float64):
    """P preference pairs as groups of 2: per-token log-probs [2P, T] (leaf), ref, a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(2 * p, t, generator=g, dtype=dtype) * 2).requires_grad_()
    ref = logprobs.detach() + 0.3 * torch.randn(2 * p, t, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (2 * p,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logprobs, ref, mask


def _seq(x: torch.Tensor, mask: torch.Tensor, i: int, mean: bool = False) -> float:
    """Response i's summed (or mean) log-prob, by hand in Python floats."""
    values = [float(v) for v, m in zip(x[i].tolist(), mask[i].tolist()) if m]
    return sum(values) / len(values) if mean else sum(values)


def _logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


# --------------------------------------------------------------------------------------------------------------
# the formulas, pair by pair
# --------------------------------------------------------------------------------------------------------------


def test_sppo_soft_is_the_papers_squared_loss():
    """SPPO (arXiv 2405.00675, Algorithm 1): per response, (log pi/ref - (P(y > pi) - 1/2) / beta)^2, summed over
    the pair, averaged over pairs. Win probabilities here are soft, as estimated from several responses."""
    p, beta = 4, 0.3
    logprobs, ref, mask = _pairs(p, seed=1)
    win = torch.tensor([[0.9, 0.2], [0.55, 0.45], [0.3, 0.8], [1.0, 0.0]], dtype=torch.float64)
    loss, stats = sppo_loss(logprobs, ref, mask, win, beta=beta)

    expected, margins = 0.0, []
    for k in range(p):
        # The pair is ordered by win probability: prompt 2 lists its winner second.
        w, l = (2 * k, 2 * k + 1) if win[k, 0] > win[k, 1] else (2 * k + 1, 2 * k)
        ratio_w = _seq(logprobs.detach(), mask, w) - _seq(ref, mask, w)
        ratio_l = _seq(logprobs.detach(), mask, l) - _seq(ref, mask, l)
        pw, pl = win.reshape(-1)[w].item(), win.reshape(-1)[l].item()
        expected += (ratio_w - (pw - 0.5) / beta) ** 2 + (ratio_l - (pl - 0.5) / beta) ** 2
        margins.append(beta * (ratio_w - ratio_l))
    assert loss.item() == pytest.approx(expected / p, rel=1e-12)
    assert stats["n_pairs"].item() == p and stats["rewards_margin"].item() == pytest.approx(sum(margins) / p)
    assert stats["win_prob_chosen"].item() == pytest.approx((0.9 + 0.55 + 0.8 + 1.0) / 4)
    assert stats["win_prob_rejected"].item() == pytest.approx((0.2 + 0.45 + 0.3 + 0.0) / 4)


def test_sppo_minimum_is_the_target_log_ratio():
    """At log pi/ref = (P - 1/2) / beta for both responses the loss and its gradient vanish."""
    beta = 0.5
    mask = torch.tensor([[True, True], [True, False]])
    ref = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64)
    win = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    # summed log-ratios +0.5 and -0.5, put on the first token
    logprobs = (ref + torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)).requires_grad_()
    loss, stats = sppo_loss(logprobs, ref, mask, win, beta=beta)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-24) and logprobs.grad.abs().max().item() < 1e-12
    assert stats["rewards_chosen"].item() == pytest.approx(0.25) and stats["rewards_accuracy"].item() == 1.0


def test_simpo_is_length_normalised_and_reference_free():
    p, beta, gamma = 4, 2.0, 0.7
    logprobs, _, mask = _pairs(p, seed=2)
    rewards = torch.tensor([[1.0, 0.0], [0.2, 0.9], [3.0, -1.0], [0.5, 0.4]], dtype=torch.float64)
    loss, stats = simpo_loss(logprobs, None, mask, rewards, beta=beta, simpo_gamma=gamma)
    expected = 0.0
    for k in range(p):
        w, l = (2 * k, 2 * k + 1) if rewards[k, 0] > rewards[k, 1] else (2 * k + 1, 2 * k)
        avg_w, avg_l = _seq(logprobs.detach(), mask, w, mean=True), _seq(logprobs.detach(), mask, l, mean=True)
        expected += -_logsigmoid(beta * (avg_w - avg_l) - gamma)
    assert loss.item() == pytest.approx(expected / p, rel=1e-12)
    # The reference plays no part: any ref_logprobs give the same loss.
    other, _ = simpo_loss(logprobs, torch.zeros_like(logprobs), mask, rewards, beta=beta, simpo_gamma=gamma)
    assert other.item() == loss.item()
    # Length-normalised: repeating a response's tokens (same mean) changes nothing.
    doubled = torch.cat([logprobs.detach(), logprobs.detach()], dim=1)
    loss2, _ = simpo_loss(doubled, None, torch.cat([mask, mask], dim=1), rewards, beta=beta, simpo_gamma=gamma)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert stats["n_pairs"].item() == p and 0 <= stats["rewards_accuracy"].item() <= 1


def test_orpo_is_nll_minus_lambda_log_sigmoid_log_odds_ratio():
    """ORPO (arXiv 2403.07691, eqs. 2-7), odds from p = exp(mean per-token log-prob), computed the plain way."""
    p, lam = 4, 0.5
    logprobs, _, mask = _pairs(p, seed=3)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [-1.0, -3.0]], dtype=torch.float64)
    loss, stats = orpo_loss(logprobs, None, mask, rewards, beta=lam)
    expected, nlls, odds = 0.0, [], []
    for k in range(p):
        w, l = (2 * k, 2 * k + 1) if rewards[k, 0] > rewards[k, 1] else (2 * k + 1, 2 * k)
        pw = math.exp(_seq(logprobs.detach(), mask, w, mean=True))
        pl = math.exp(_seq(logprobs.detach(), mask, l, mean=True))
        log_odds = math.log((pw / (1 - pw)) / (pl / (1 - pl)))
        expected += -math.log(pw) - lam * _logsigmoid(log_odds)
        nlls.append(-math.log(pw))
        odds.append(log_odds)
    assert loss.item() == pytest.approx(expected / p, rel=1e-10)
    assert stats["nll"].item() == pytest.approx(sum(nlls) / p, rel=1e-10)
    assert stats["log_odds"].item() == pytest.approx(sum(odds) / p, rel=1e-10)


def test_dpo_entry_is_oaifs_sigmoid_on_summed_logprobs():
    """The registry's "dpo" reuses oaif_loss with no options of its own, so solver.dpo_loss cannot turn it to IPO."""
    spec = get_loss("dpo")
    assert spec.loss_fn is oaif_loss and spec.options == {}

    class Solver:
        dpo_loss = "ipo"

    assert spec.options_for(Solver()) == {}
    logprobs, ref, mask = _pairs(3, seed=4)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.1]], dtype=torch.float64)
    loss, _ = spec.loss_fn(logprobs, ref, mask, rewards, beta=0.05)
    expected = 0.0
    for k in range(3):
        w, l = (2 * k, 2 * k + 1) if rewards[k, 0] > rewards[k, 1] else (2 * k + 1, 2 * k)
        h = (_seq(logprobs.detach(), mask, w) - _seq(ref, mask, w)) - (_seq(logprobs.detach(), mask, l)
                                                                        - _seq(ref, mask, l))
        expected += -_logsigmoid(0.05 * h)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# gradients, pairs, edge cases
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sppo", "simpo", "orpo"])
def test_gradients_match_finite_differences(name):
    logprobs, ref, mask = _pairs(3, t=4, seed=5)
    targets = torch.tensor([[0.8, 0.1], [0.3, 0.6], [0.5, 0.4]], dtype=torch.float64)
    fn = {"sppo": lambda x: sppo_loss(x, ref, mask, targets, beta=0.7)[0],
          "simpo": lambda x: simpo_loss(x, None, mask, targets, beta=2.0, simpo_gamma=0.5)[0],
          "orpo": lambda x: orpo_loss(x, None, mask, targets, beta=0.5)[0]}[name]
    assert torch.autograd.gradcheck(fn, (logprobs,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sppo", "simpo", "orpo"])
def test_descending_raises_the_chosen_response_over_the_rejected(name):
    logprobs, ref, mask = _pairs(2, seed=6)
    targets = torch.tensor([[0.9, 0.1], [0.2, 0.7]], dtype=torch.float64)
    loss, _ = get_loss(name).loss_fn(logprobs, ref, mask, targets, beta=0.5)
    (grad,) = torch.autograd.grad(loss, logprobs)
    step = logprobs.detach() - 0.05 * grad  # one small gradient step on the per-token log-probs
    rows = {"chosen": [0, 3], "rejected": [1, 2]}
    before = {k: sum(_seq(logprobs.detach(), mask, i, mean=True) for i in v) for k, v in rows.items()}
    after = {k: sum(_seq(step, mask, i, mean=True) for i in v) for k, v in rows.items()}
    assert after["chosen"] - after["rejected"] > before["chosen"] - before["rejected"]


@pytest.mark.parametrize("name", ["sppo", "simpo", "orpo"])
def test_pairs_are_picked_by_target_ties_give_none_and_no_pair_backprops_zero(name):
    fn = get_loss(name).loss_fn
    logprobs, ref, mask = _pairs(3, seed=7)
    targets = torch.tensor([[0.8, 0.3], [0.5, 0.5], [0.2, 0.6]], dtype=torch.float64)
    loss, stats = fn(logprobs, ref, mask, targets, beta=0.5)
    assert stats["n_pairs"].item() == 2 and stats["pair_fraction"].item() == pytest.approx(2 / 3)
    # Swapping the two responses of each group (and their targets) is the same set of pairs.
    swap = torch.tensor([1, 0, 3, 2, 5, 4])
    swapped, _ = fn(logprobs[swap], ref[swap], mask[swap], targets.flip(1), beta=0.5)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-12)
    # A batch of ties only: loss 0, still connected to the graph, zero gradient.
    ties = torch.full((3, 2), 0.5, dtype=torch.float64)
    empty, stats = fn(logprobs, ref, mask, ties, beta=0.5)
    empty.backward()
    assert empty.item() == 0.0 and stats["n_pairs"].item() == 0 and (logprobs.grad == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_log1mexp_is_accurate_and_finite_on_both_sides():
    x = torch.tensor([-1e-12, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -40.0], dtype=torch.float64,
                     requires_grad=True)
    y = log1mexp(x)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert y.tolist() == pytest.approx(expected, rel=1e-14)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.tolist() == pytest.approx([-math.exp(v) / -math.expm1(v) for v in x.tolist()], rel=1e-10)


def test_orpo_stays_finite_for_a_response_of_probability_one():
    logprobs = torch.tensor([[0.0, 0.0], [-1.0, -2.0]], dtype=torch.float32, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = orpo_loss(logprobs, None, mask, torch.tensor([[1.0, 0.0]]), beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all() and stats["nll"].item() == 0.0


@pytest.mark.parametrize("bad", [1.5, -0.1, NAN, float("inf")])
def test_sppo_refuses_targets_that_are_not_probabilities(bad):
    logprobs, ref, mask = _pairs(2, seed=8)
    win = torch.tensor([[0.9, 0.1], [bad, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sppo: rewards must be win probabilities P\(y > pi\) in \[0, 1\]; 1 of 4"):
        sppo_loss(logprobs, ref, mask, win, beta=0.1)


def test_bad_arguments_are_named():
    logprobs, ref, mask = _pairs(2, seed=9)
    win = torch.tensor([[0.9, 0.1], [0.3, 0.2]], dtype=torch.float64)
    with pytest.raises(ValueError, match="sppo: needs ref_logprobs"):
        sppo_loss(logprobs, None, mask, win, beta=0.1)
    for fn, name in [(sppo_loss, "sppo"), (simpo_loss, "simpo"), (orpo_loss, "orpo")]:
        with pytest.raises(ValueError, match=rf"{name}: beta must be > 0, got 0.0"):
            fn(logprobs, ref, mask, win, beta=0.0)
        with pytest.raises(ValueError, match=r"logprobs must be \[B, T\] with B = P \* N = 6"):
            fn(logprobs, ref[:, :3], mask, torch.full((3, 2), 0.5, dtype=torch.float64), beta=0.1)
    with pytest.raises(ValueError, match=r"simpo: simpo_gamma must be a finite number >= 0, got -1.0"):
        simpo_loss(logprobs, None, mask, win, beta=1.0, simpo_gamma=-1.0)


# --------------------------------------------------------------------------------------------------------------
# registry: the paper's recipe table
# --------------------------------------------------------------------------------------------------------------

# arXiv 2411.00062, appendix "Hyperparameter settings": lr, schedule, beta, epochs, batch, max length, max prompt
# length, optimizer (warm-up 0.1 for all).
PAPER = {
    "dpo": (5e-7, "cosine", 0.05, 2, 8, 2048, 1024, "adamw"),
    "orpo": (5e-7, "cosine", 0.5, 1, 8, 2048, 1024, "adamw"),  # beta holds ORPO's lambda
    "simpo": (8e-7, "cosine", 10.0, 1, 32, 2048, 1024, "adamw"),
    "sppo": (5e-7, "linear", 0.001, 6, 8, 1024, 512, "rmsprop"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_offline_specs_carry_the_papers_recipe(name):
    spec = LOSSES[name]
    d = spec.defaults
    assert (d.lr, d.lr_schedule, d.beta, d.epochs, d.batch_size, d.max_length, d.max_prompt_length,
            d.optimizer) == PAPER[name]
    assert d.warmup_ratio == 0.1
    assert (spec.view, spec.unit, spec.beta_positive, spec.ratio, spec.importance_weights) == (
        "pairs", "group", True, False, False)
    assert spec.reference == ("always" if name in ("dpo", "sppo") else "never")
    assert spec.needs_reference(0.05) == (name in ("dpo", "sppo"))
    assert spec.targets == ("win_probs" if name == "sppo" else "rewards")
    assert d.options == ({"simpo_gamma": 5.0} if name == "simpo" else {})
    assert "needs beta > 0" in spec.check_beta(0.0)


def test_simpo_reads_gamma_from_the_solver_config():
    from eva_ray.config import SolverConfig

    assert get_loss("simpo").options_for(SolverConfig(simpo_gamma=1.5)) == {"simpo_gamma": 1.5}
    assert SolverConfig().simpo_gamma == LOSSES["simpo"].defaults.options["simpo_gamma"]
