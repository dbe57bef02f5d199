"""Token log-probabilities, masked reductions and KL estimators shared by the policy losses.

Every function here is a pure tensor function. Shapes use ``B`` for the number of responses, ``T`` for the
(padded) response length and ``V`` for the vocabulary. A ``mask`` is ``[B, T]``, bool or 0/1 float, and marks the
response tokens that count (1) versus padding and prompt positions (0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from eva_ray.losses.choices import KL_ESTIMATOR_NAMES

__all__ = [
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "safe_mean",
    "sequence_logprobs",
    "token_logprobs",
]

# Rows of the flattened [B * T, V] logits processed at once. Under no_grad (reference and old log-probs) only one
# chunk is upcast to float32 at a time, so the extra memory is about chunk_size * V * 4 bytes (1024 rows x 150k vocab
# = 600 MB) however long the batch is. With grad, autograd keeps every chunk for backward, as any log-softmax would.
_DEFAULT_CHUNK_ROWS = 1024


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _float_chunks(logits: torch.Tensor, temperature: float, chunk_size: int) -> Iterator[torch.Tensor]:
    """Flatten ``[..., V]`` to ``[N, V]`` and yield float32 (or float64) chunks already divided by ``temperature``.

    Half-precision logits are upcast chunk by chunk: a log-softmax in bf16 loses about two decimal digits, and the
    per-token error then adds up over hundreds of tokens in a sequence log-probability.
    """
    for chunk in logits.reshape(-1, logits.shape[-1]).split(chunk_size, dim=0):
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        yield chunk / temperature if temperature != 1.0 else chunk


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
    chunk_size: int = _DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Log-probability of each label token under ``softmax(logits / temperature)``.

    Uses ``log p(y) = z_y - logsumexp(z)`` on chunks of rows, so the full ``[B, T, V]`` log-softmax is never
    materialised. ``temperature`` must equal the sampling temperature of the rollout: the policy gradient is taken
    on the distribution the responses were actually drawn from.

    Args:
        logits: ``[B, T, V]`` next-token logits, already aligned with ``labels`` (position t predicts labels[:, t]).
        labels: ``[B, T]`` token ids. Positions equal to ``ignore_index`` get log-probability 0.
        temperature: sampling temperature (> 0).
        ignore_index: label value for positions to skip.
        chunk_size: rows of the flattened ``[B * T, V]`` logits processed at once.

    Returns:
        ``[B, T]`` log-probabilities; float32 for half-precision logits, else the logits' dtype.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0).reshape(-1)
    out = []
    start = 0
    for chunk in _float_chunks(logits, temperature, chunk_size):
        idx = safe_labels[start : start + chunk.shape[0]].unsqueeze(-1)
        out.append(chunk.gather(-1, idx).squeeze(-1) - chunk.logsumexp(dim=-1))
        start += chunk.shape[0]
    logps = torch.cat(out).reshape(labels.shape)
    return logps.masked_fill(ignored, 0.0)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_size: int = _DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits / temperature)`` at every position.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, computed chunk by chunk like :func:`token_logprobs`.

    Args:
        logits: ``[B, T, V]``.
        temperature: sampling temperature (> 0).
        chunk_size: rows of the flattened logits processed at once.

    Returns:
        ``[B, T]``; float32 for half-precision logits, else the logits' dtype.
    """
    _check_temperature(temperature)
    out = []
    for chunk in _float_chunks(logits, temperature, chunk_size):
        out.append(chunk.logsumexp(dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is set.

    Masked positions are *selected away* (``torch.where``) rather than multiplied by 0: padding may hold ``inf`` or
    ``NaN`` (e.g. a log-prob of a pad token), and ``inf * 0`` would poison the sum and its gradient.

    Args:
        x: any shape, e.g. ``[B, T]``.
        mask: broadcastable to ``x``; bool or 0/1.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; 0 (not NaN) where nothing is set.

    Args:
        x: any shape, e.g. ``[B, T]``.
        mask: broadcastable to ``x``; bool or 0/1.
        dim: dimension to reduce; ``None`` gives the mean over every selected element (a token-level mean).
    """
    mask = mask.bool().expand_as(x)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # clamp(min=1): an all-zero mask gives 0 / 1 = 0 and a zero gradient, where 0 / 0 would give NaN.
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def safe_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every element of ``x``; 0 for an empty tensor (an empty batch must not make a loss NaN)."""
    return x.sum() / max(x.numel(), 1)


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each whole response: ``sum_t mask_t * logp_t``.

    Args:
        token_lp: ``[B, T]`` per-token log-probabilities.
        mask: ``[B, T]`` response-token mask.

    Returns:
        ``[B]``.
    """
    return masked_sum(token_lp, mask, dim=-1)


# KL(pi || pi_ref) estimators from samples y ~ pi, per token, with log-ratio d = logp - ref_logp (J. Schulman,
# "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):
#   k1 = d                      unbiased, high variance, can be negative per token
#   k2 = d^2 / 2                biased, low variance, >= 0
#   k3 = exp(-d) + d - 1        unbiased, low variance, >= 0 (the "low_var_kl" of GRPO / verl)
def _kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def _kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp).square()


def _kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    neg_log_ratio = ref_logp - logp
    # expm1(x) - x equals exp(x) - x - 1 but does not cancel catastrophically when x is near 0 (the usual case).
    return torch.expm1(neg_log_ratio) - neg_log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}
assert tuple(KL_ESTIMATORS) == KL_ESTIMATOR_NAMES


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Args:
        logp: ``[B, T]`` log-probs under the policy.
        ref_logp: ``[B, T]`` log-probs of the same tokens under the reference policy.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (Schulman 2020; see ``KL_ESTIMATORS``).

    Returns:
        ``[B, T]`` per-token estimate (padding is not masked here; reduce with :func:`masked_sum`).
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {sorted(KL_ESTIMATORS)}") from None
    return fn(logp, ref_logp)


def check_grouped_shapes(logprobs: torch.Tensor, rewards: torch.Tensor,
                         **same_as_logprobs: torch.Tensor | None) -> tuple[int, int]:
    """Check the grouped layout both policy losses share; returns ``(P, N)``.

    ``rewards`` is ``[P, N]``, ``logprobs`` is ``[B, T]`` with ``B = P * N``, and every named tensor that is not None
    (mask, reference or old log-probs) has the shape of ``logprobs``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, N], got shape {tuple(rewards.shape)}")
    num_prompts, n = rewards.shape
    if logprobs.dim() != 2 or logprobs.shape[0] != num_prompts * n:
        raise ValueError(
            f"logprobs must be [B, T] with B = P * N = {num_prompts * n} (rewards {tuple(rewards.shape)}), "
            f"got {tuple(logprobs.shape)}"
        )
    for name, t in same_as_logprobs.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must match logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")
    return num_prompts, n
