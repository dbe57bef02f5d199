"""SPPO, SimPO and ORPO: the offline preference losses of eva (arXiv 2411.00062, Table 2) besides DPO.

DPO itself is :func:`eva_ray.losses.dpo.oaif_loss` (sigmoid, summed log-probs). Each function here has the
registry's call shape (:mod:`eva_ray.losses.registry`) and trains on the best-vs-worst pair of each prompt group
(:func:`eva_ray.losses.dpo.pair_rows`); the offline loop hands over one group of two per preference pair, chosen
first. Notation: ``lr(y) = log pi(y|x) - log ref(y|x)`` with summed token log-probs; ``avg(y)`` the mean per-token
log-prob of ``y`` under the policy; ``(y_w, y_l)`` the chosen and rejected responses.

SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675,
Algorithm 1) regresses each response's log-ratio onto its estimated win probability against the policy:

    L = (lr(y_w) - (P(y_w > pi) - 1/2) / beta)^2 + (lr(y_l) - (P(y_l > pi) - 1/2) / beta)^2

(``beta`` is the paper's ``1 / eta``; the reference is the policy the iteration started from). With probabilities
1 and 0 this is TRL's ``sppo_hard``. The SPPO authors' trainer halves the sum; under RMSprop or Adam, which divide
the gradient by its running scale, that factor only shifts the epsilon's weight.

SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734,
eq. 6), reference-free and length-normalised:

    L = -log sigmoid(beta * (avg(y_w) - avg(y_l)) - gamma)

ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691,
eqs. 2-7), with ``lambda`` passed as ``beta`` and the odds of a response ``odds(y) = p / (1 - p)`` at
``p = exp(avg(y))``:

    L = -avg(y_w) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))

The NLL term runs over the chosen response's tokens only (the learner has no prompt log-probs) and is averaged per
response, then over pairs, so each pair's loss depends on that pair alone (the learner's "group" unit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eva_ray.losses.dpo import PairRows, pair_rows
from eva_ray.losses.logprobs import check_grouped_shapes, masked_mean, safe_mean, sequence_logprobs

__all__ = ["check_win_probs", "log1mexp", "orpo_loss", "simpo_loss", "sppo_loss"]

_LN2 = math.log(2.0)


def _check_beta(name: str, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")


def _pairs(logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
           ref_logprobs: torch.Tensor | None = None) -> PairRows:
    check_grouped_shapes(logprobs, rewards, mask=mask, ref_logprobs=ref_logprobs)
    return pair_rows(rewards)


def _margin_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean implicit rewards of the chosen and rejected responses, their gap, and how often chosen is ahead."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards_chosen": safe_mean(chosen),
        "rewards_rejected": safe_mean(rejected),
        "rewards_margin": safe_mean(chosen - rejected),
        "rewards_accuracy": safe_mean((chosen > rejected).float()),
    }


def check_win_probs(rewards: torch.Tensor) -> None:
    """Raise ValueError unless every entry of ``rewards`` is a probability: finite and in ``[0, 1]``."""
    bad = ~(torch.isfinite(rewards) & (rewards >= 0) & (rewards <= 1))
    if bad.any():
        example = rewards[bad].flatten()[0].item()
        raise ValueError(f"sppo: rewards must be win probabilities P(y > pi) in [0, 1]; {int(bad.sum())} of "
                         f"{rewards.numel()} are not (e.g. {example})")


def sppo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPPO's squared loss on the best-vs-worst pair of each prompt (module docstring).

    Args:
        logprobs: ``[B, T]`` policy per-token log-probs (with grad).
        ref_logprobs: ``[B, T]`` reference per-token log-probs (the iteration's starting policy).
        mask: ``[B, T]`` response-token mask.
        rewards: ``[P, N]`` win probabilities ``P(y > pi | x)`` in ``[0, 1]``; the pair of a prompt is its most and
            least likely winner (a tie gives no pair, as everywhere under the ``pairs`` view).
        beta: > 0 (the paper's ``1 / eta``; eva: 0.001).

    Returns:
        ``(loss, stats)``: the mean over pairs of the two squared errors; stats ``loss``, ``n_pairs``,
        ``rewards_*`` of the implicit rewards ``beta * lr(y)``, ``win_prob_chosen`` / ``win_prob_rejected`` (mean
        targets), ``pair_fraction`` and ``score_margin`` (mean win-probability gap).
    """
    _check_beta("sppo", beta)
    if ref_logprobs is None:
        raise ValueError("sppo: needs ref_logprobs (the log-ratio is taken against the iteration's start)")
    check_win_probs(rewards)
    pairs = _pairs(logprobs, mask, rewards, ref_logprobs)
    ratio = sequence_logprobs(logprobs, mask) - sequence_logprobs(ref_logprobs.detach(), mask)
    target = (rewards.reshape(-1).to(ratio.dtype) - 0.5) / beta
    chosen_err = ratio[pairs.chosen] - target[pairs.chosen]
    rejected_err = ratio[pairs.rejected] - target[pairs.rejected]
    loss = safe_mean(chosen_err.square() + rejected_err.square())
    flat = rewards.detach().reshape(-1)
    stats = {
        "loss": loss.detach(),
        "n_pairs": torch.tensor(float(pairs.chosen.numel()), device=logprobs.device),
        **_margin_stats(beta * ratio[pairs.chosen], beta * ratio[pairs.rejected]),
        "win_prob_chosen": safe_mean(flat[pairs.chosen].float()),
        "win_prob_rejected": safe_mean(flat[pairs.rejected].float()),
    }
    return loss, stats | pairs.stats(rewards)


def simpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    simpo_gamma: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO on the best-vs-worst pair of each prompt (module docstring); ``ref_logprobs`` is ignored.

    Args:
        beta: > 0, the reward scale (eva: 10).
        simpo_gamma: >= 0, the target reward margin (eva: 5).

    Returns:
        ``(loss, stats)``: the mean over pairs; stats ``loss``, ``n_pairs``, ``rewards_*`` of the rewards
        ``beta * avg(y)`` (TRL CPOTrainer's), ``logps_chosen`` / ``logps_rejected`` (mean ``avg``),
        ``pair_fraction``, ``score_margin``.
    """
    _check_beta("simpo", beta)
    if not (math.isfinite(simpo_gamma) and simpo_gamma >= 0):
        raise ValueError(f"simpo: simpo_gamma must be a finite number >= 0, got {simpo_gamma}")
    pairs = _pairs(logprobs, mask, rewards)
    avg = masked_mean(logprobs, mask, dim=-1)
    chosen, rejected = avg[pairs.chosen], avg[pairs.rejected]
    loss = safe_mean(-F.logsigmoid(beta * (chosen - rejected) - simpo_gamma))
    stats = {
        "loss": loss.detach(),
        "n_pairs": torch.tensor(float(chosen.numel()), device=logprobs.device),
        **_margin_stats(beta * chosen, beta * rejected),
        "logps_chosen": safe_mean(chosen.detach()),
        "logps_rejected": safe_mean(rejected.detach()),
    }
    return loss, stats | pairs.stats(rewards)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below.

    Each branch sees only inputs where it is finite, so the unused one cannot put a NaN into the gradient.
    """
    near_zero = x > -_LN2
    upper = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -_LN2))))
    lower = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -_LN2), x)))
    return torch.where(near_zero, upper, lower)


def orpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO on the best-vs-worst pair of each prompt (module docstring); ``beta`` is ORPO's ``lambda``.

    A response whose every token has probability 1 (``avg = 0``) has infinite odds; its ``avg`` is taken as
    ``-eps`` (the dtype's) inside the odds so the loss stays finite, which only matters for such a response.

    Args:
        beta: > 0, ``lambda``, the weight of the odds-ratio term (eva: 0.5).

    Returns:
        ``(loss, stats)``: the mean over pairs; stats ``loss``, ``n_pairs``, ``nll`` (mean ``-avg(y_w)``),
        ``log_odds`` (mean log odds ratio), ``log_sigmoid_odds`` (mean ``log sigmoid`` of it), ``rewards_*`` of
        ``lambda * avg(y)`` (TRL ORPOTrainer's), ``pair_fraction``, ``score_margin``.
    """
    _check_beta("orpo", beta)
    pairs = _pairs(logprobs, mask, rewards)
    avg = masked_mean(logprobs, mask, dim=-1)
    chosen, rejected = avg[pairs.chosen], avg[pairs.rejected]
    below_zero = avg.clamp(max=-torch.finfo(avg.dtype).eps)
    log_odds_each = below_zero - log1mexp(below_zero)  # log(p / (1 - p)) at log p = avg
    log_odds = log_odds_each[pairs.chosen] - log_odds_each[pairs.rejected]
    nll = -chosen
    log_sigmoid_odds = F.logsigmoid(log_odds)
    loss = safe_mean(nll - beta * log_sigmoid_odds)
    stats = {
        "loss": loss.detach(),
        "n_pairs": torch.tensor(float(chosen.numel()), device=logprobs.device),
        "nll": safe_mean(nll.detach()),
        "log_odds": safe_mean(log_odds.detach()),
        "log_sigmoid_odds": safe_mean(log_sigmoid_odds.detach()),
        **_margin_stats(beta * chosen, beta * rejected),
    }
    return loss, stats | pairs.stats(rewards)
