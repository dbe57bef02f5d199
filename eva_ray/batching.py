"""Training batches: rollouts grouped per prompt, collated into padded tensors the learner runs the policy on.

The learner receives ``P`` prompt groups of ``N`` :class:`~eva_ray.rollouts.Rollout` each and their rewards
``[P, N]``. :func:`collate` lays them out as one row per response, grouped per prompt *contiguously* (rows
``p * N .. p * N + N - 1`` answer prompt ``p``, in the order of ``rewards[p]``), which is the layout
:mod:`eva_ray.losses` expects.

Layout of a row (left-padded prompt, right-padded response; the layout TRL and OpenRLHF train on)::

    column:   0 .. W-p-1   W-p .. W-1   W .. W+r-1   W+r .. L-1          W = prompt_width = max prompt length
    token:    pad ...      prompt       response     pad ...             L = W + response_width

Every response starts at the same column ``W``, so the response tokens of the whole batch form one block
``input_ids[:, W:]`` of shape ``[B, R]`` (``R = response_width``). The logits that predict them are those at
positions ``W - 1 .. L - 2``: the learner asks the model for the last ``R + 1`` positions only (``logits_to_keep``)
and never materialises ``[B, L, V]`` logits over long prompts. ``position_ids`` count real tokens only
(``cumsum(attention_mask) - 1``), so a left-padded prompt sees the same rotary positions as an unpadded one and
padding does not change any log-probability (tested against a real model).

Micro-batches (:func:`micro_batches`) hold whole prompt groups. The policy losses (RLOO and OAIF, see
:func:`share`) are means over units (sequences, tokens or pairs) of terms that depend only on their own group, so
accumulating ``share * micro_loss`` over micro-batches gives the full-batch gradient exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from eva_ray.losses import select_preference_pairs
from eva_ray.losses.registry import UNITS as SHARE_UNITS
from eva_ray.losses.registry import VIEWS
from eva_ray.rollouts import Rollout, shard

__all__ = ["SHARE_UNITS", "TrainBatch", "batch_view", "collate", "groups_with_spread", "micro_batches",
           "right_pad", "share_units", "split_groups", "select_pairs", "share"]


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for ``B = P * N`` responses to ``P`` prompts (see the module docstring for the layout).

    Shapes: ``B`` rows, ``L = prompt_width + response_width`` columns.
    """

    input_ids: torch.Tensor
    """``[B, L]`` long: left-padded prompt, then the response, then right padding."""
    attention_mask: torch.Tensor
    """``[B, L]`` long: 1 on prompt and response tokens, 0 on padding."""
    position_ids: torch.Tensor
    """``[B, L]`` long: ``cumsum(attention_mask) - 1`` clamped at 0 (padding positions hold 0)."""
    response_mask: torch.Tensor
    """``[B, L - 1]`` bool, aligned with next-token log-probs: column ``t`` is True iff ``input_ids[:, t + 1]`` is a
    response token (so the logits at position ``t`` predict a response token)."""
    prompt_lengths: torch.Tensor
    """``[B]`` long: real prompt tokens per row."""
    response_lengths: torch.Tensor
    """``[B]`` long: real response tokens per row."""
    rewards: torch.Tensor
    """``[P, N]`` float32; non-finite entries mean "no reward" (the losses handle them)."""
    policy_versions: torch.Tensor
    """``[B]`` long: the policy version that sampled each response."""
    prompt_ids: tuple[str, ...]
    """``P`` prompt ids, in group order."""
    prompt_width: int
    """``W``: the column where every response starts (the longest prompt; responses are padded after it)."""
    pad_token_id: int
    """The id used for padding (``attention_mask`` says which positions are padding, not this id)."""
    behaviour_logprobs: torch.Tensor | None = None
    """``[B, R]`` float32: the log-prob the rollout engine gave each response token as it sampled it (after its
    temperature and top-p), 0 on padding; None when any rollout came without them. The learner's importance
    weights for rollouts that lag its policy (``learner.off_policy_correction``) divide by these."""

    # --------------------------------------------------------------------------------------------- sizes

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        """``R``: columns of the response block (the longest response, unless rows were dropped untrimmed)."""
        return self.input_ids.shape[1] - self.prompt_width

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_lengths.sum().item())

    # ------------------------------------------------------------------------------------ response block

    @property
    def response_ids(self) -> torch.Tensor:
        """``[B, R]``: the response tokens (right-padded), the labels of the log-probs the losses use."""
        return self.input_ids[:, self.prompt_width:]

    @property
    def response_token_mask(self) -> torch.Tensor:
        """``[B, R]`` bool: ``response_mask`` restricted to the response block, i.e. the positions ``W - 1 .. L - 2``
        whose logits predict ``response_ids``. The ``mask`` argument of the policy losses."""
        return self.response_mask[:, self.prompt_width - 1:]

    # -------------------------------------------------------------------------------------- transforms

    def to(self, device: torch.device | str) -> TrainBatch:
        """A copy with every tensor on ``device``."""
        tensors = {name: getattr(self, name).to(device) for name in _ROW_TENSORS + ("rewards",)}
        if self.behaviour_logprobs is not None:
            tensors["behaviour_logprobs"] = self.behaviour_logprobs.to(device)
        return replace(self, **tensors)

    def select_groups(self, groups: Sequence[int]) -> TrainBatch:
        """The sub-batch of the given prompt groups (in the given order), with padding columns trimmed to fit.

        Trimming removes leading columns that are padding in every selected row and trailing ones likewise; a
        response still starts at the (new) ``prompt_width``, so response-block tensors of sub-batches line up
        column by column with the full batch's (column ``j`` is response token ``j``).
        """
        n = self.group_size
        index = torch.tensor([g * n + j for g in groups for j in range(n)], dtype=torch.long,
                             device=self.input_ids.device)
        rows = {name: getattr(self, name).index_select(0, index) for name in _ROW_TENSORS}
        group_index = torch.as_tensor(list(groups), dtype=torch.long, device=self.rewards.device)
        behaviour = (self.behaviour_logprobs.index_select(0, index.to(self.behaviour_logprobs.device))
                     if self.behaviour_logprobs is not None else None)
        sub = replace(self, rewards=self.rewards.index_select(0, group_index),
                      prompt_ids=tuple(self.prompt_ids[g] for g in groups), behaviour_logprobs=behaviour, **rows)
        if not len(groups):
            return sub
        new_prompt_w = int(sub.prompt_lengths.max().item())
        new_response_w = int(sub.response_lengths.max().item())
        start = self.prompt_width - new_prompt_w
        width = new_prompt_w + new_response_w
        return replace(sub, prompt_width=new_prompt_w, input_ids=sub.input_ids[:, start:start + width],
                       behaviour_logprobs=behaviour[:, :new_response_w] if behaviour is not None else None,
                       attention_mask=sub.attention_mask[:, start:start + width],
                       position_ids=sub.position_ids[:, start:start + width],
                       response_mask=sub.response_mask[:, start:start + width - 1])


# Tensors with one row per response (rewards is per prompt and handled apart).
_ROW_TENSORS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids", "response_mask", "prompt_lengths",
                                 "response_lengths", "policy_versions")


def collate(groups: Sequence[Sequence[Rollout]], rewards: torch.Tensor | Sequence[Sequence[float]],
            pad_token_id: int) -> TrainBatch:
    """Lay out ``P`` groups of ``N`` rollouts and their rewards as one :class:`TrainBatch`.

    Args:
        groups: ``groups[p][j]`` is the j-th response to prompt p. Every group has the same N >= 1 rollouts, all of
            the same prompt (same ``prompt_id`` and ``prompt_token_ids``), and every prompt has at least one token
            (the first response token needs a position to be predicted from).
        rewards: ``[P, N]``, ``rewards[p][j]`` scores ``groups[p][j]``; NaN marks a response without a reward.
        pad_token_id: fills padding positions (they are masked out; the id only has to be a valid token).

    Returns:
        The batch on the CPU.
    """
    if not groups:
        raise ValueError("collate: no prompt groups")
    n = len(groups[0])
    if n < 1:
        raise ValueError("collate: a prompt group has no rollouts")
    for p, group in enumerate(groups):
        if len(group) != n:
            raise ValueError(f"collate: every group needs the same number of responses; group 0 has {n}, "
                             f"group {p} ({group[0].prompt_id if group else '?'}) has {len(group)}")
        first = group[0]
        for r in group[1:]:
            if r.prompt_id != first.prompt_id or r.prompt_token_ids != first.prompt_token_ids:
                raise ValueError(f"collate: group {p} mixes prompts ({first.prompt_id!r} and {r.prompt_id!r}); "
                                 "a group holds the responses to one prompt")
        if not first.prompt_token_ids:
            raise ValueError(f"collate: prompt {first.prompt_id!r} has no tokens")
    rewards_t = torch.as_tensor(rewards, dtype=torch.float32).detach().cpu().clone()
    if rewards_t.shape != (len(groups), n):
        raise ValueError(f"collate: rewards must be [P, N] = [{len(groups)}, {n}], got {tuple(rewards_t.shape)}")

    rows = [r for group in groups for r in group]
    prompt_w = max(len(r.prompt_token_ids) for r in rows)
    response_w = max(len(r.response_token_ids) for r in rows)
    width = prompt_w + response_w
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        p, q = len(r.prompt_token_ids), len(r.response_token_ids)
        input_ids[i, prompt_w - p:prompt_w] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        input_ids[i, prompt_w:prompt_w + q] = torch.tensor(r.response_token_ids, dtype=torch.long)
        attention_mask[i, prompt_w - p:prompt_w + q] = 1
    response_lengths = torch.tensor([len(r.response_token_ids) for r in rows], dtype=torch.long)
    behaviour = None
    if all(r.logprobs is not None and len(r.logprobs) == len(r.response_token_ids) for r in rows):
        behaviour = torch.zeros((len(rows), response_w), dtype=torch.float32)
        for i, r in enumerate(rows):
            behaviour[i, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    # Logits at column t predict token t + 1; response token j sits at column prompt_w + j, so it is predicted at
    # column prompt_w - 1 + j. The mask therefore starts one column before the response block.
    cols = torch.arange(width - 1)
    offset = cols.unsqueeze(0) - (prompt_w - 1)
    response_mask = (offset >= 0) & (offset < response_lengths.unsqueeze(1))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        response_mask=response_mask,
        prompt_lengths=torch.tensor([len(r.prompt_token_ids) for r in rows], dtype=torch.long),
        response_lengths=response_lengths,
        rewards=rewards_t,
        policy_versions=torch.tensor([r.policy_version for r in rows], dtype=torch.long),
        prompt_ids=tuple(group[0].prompt_id for group in groups),
        prompt_width=prompt_w,
        pad_token_id=int(pad_token_id),
        behaviour_logprobs=behaviour,
    )


def groups_with_spread(rewards: torch.Tensor) -> torch.Tensor:
    """``[P]`` bool: prompts with at least two finite rewards that differ.

    Only such a prompt carries a learning signal from its rewards: an RLOO advantage that is not zero, or an OAIF
    preference pair. (Same rule as :func:`eva_ray.losses.select_preference_pairs`.)
    """
    return select_preference_pairs(rewards)[2]


def select_pairs(batch: TrainBatch) -> TrainBatch:
    """OAIF's training batch: for every prompt with reward spread, its best and its worst response.

    The result has ``P'`` groups of 2 rows, ``[chosen, rejected]``, with rewards ``[P', 2]``; ``oaif_loss`` on it
    selects exactly these pairs again, so the learner only runs the policy and the reference model on ``2 P'``
    responses instead of ``N P``. Raises ValueError when no prompt has a pair (check :func:`groups_with_spread`).
    """
    chosen, rejected, valid = select_preference_pairs(batch.rewards)
    keep = valid.nonzero().flatten().tolist()
    if not keep:
        raise ValueError("select_pairs: no prompt has two different finite rewards")
    n = batch.group_size
    index = torch.tensor([g * n + int(i) for g in keep for i in (chosen[g], rejected[g])], dtype=torch.long)
    rows = {name: getattr(batch, name).index_select(0, index.to(batch.input_ids.device)) for name in _ROW_TENSORS}
    pair_rewards = torch.stack([batch.rewards[keep, chosen[keep]], batch.rewards[keep, rejected[keep]]], dim=1)
    behaviour = batch.behaviour_logprobs
    if behaviour is not None:
        behaviour = behaviour.index_select(0, index.to(behaviour.device))
    pairs = replace(batch, rewards=pair_rewards, prompt_ids=tuple(batch.prompt_ids[g] for g in keep),
                    behaviour_logprobs=behaviour, **rows)
    return pairs.select_groups(range(len(keep)))  # trims the padding the dropped responses needed


def batch_view(batch: TrainBatch, view: str) -> TrainBatch:
    """The part of ``batch`` a loss trains on (its spec's ``view``): every group as it is, or :func:`select_pairs`."""
    if view == "groups":
        return batch
    if view == "pairs":
        return select_pairs(batch)
    raise ValueError(f"unknown batch view {view!r}; allowed: {list(VIEWS)}")


def micro_batches(batch: TrainBatch, size: int) -> list[TrainBatch]:
    """Split ``batch`` into micro-batches of whole prompt groups, ``max(1, size // N)`` groups each, in order.

    A group is never split: its leave-one-out baseline (RLOO) or its pair (OAIF) needs all its responses in one
    loss call. When ``size < N`` a micro-batch is one group, ``N`` sequences.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    per = max(1, size // batch.group_size)
    return [batch.select_groups(range(start, min(start + per, batch.num_prompts)))
            for start in range(0, batch.num_prompts, per)]


def share_units(batch: TrainBatch, unit: str) -> float:
    """How many loss units ``batch`` holds: sequences, valid response tokens, or prompt groups (see :func:`share`)."""
    if unit == "sequence":
        return float(batch.num_sequences)
    if unit == "token":
        return float(batch.num_response_tokens)
    if unit == "group":
        return float(batch.num_prompts)
    raise ValueError(f"unknown share unit {unit!r}; allowed: {list(SHARE_UNITS)}")


def share(micro: TrainBatch, full: TrainBatch, unit: str) -> float:
    """The weight of ``micro``'s mean loss in the full batch's mean loss.

    A policy loss here is a mean ``(1 / |U|) sum_{u in U} l_u`` over units ``U`` (``"sequence"``: RLOO with
    sequence aggregation; ``"token"``: RLOO with token aggregation, whose policy and KL terms are means over all
    valid response tokens; ``"group"``: OAIF, one pair per group after :func:`select_pairs`), where each ``l_u``
    depends only on its own prompt group (the leave-one-out baseline and the preference pair are per group). With
    micro-batches ``k`` of whole groups, ``U`` splits into disjoint ``U_k`` and

        loss = sum_k (|U_k| / |U|) * mean_{u in U_k} l_u,

    so accumulating ``share * micro_loss`` gives the full-batch loss and gradient exactly. This stops being exact
    for anything normalised over the whole batch (advantage whitening), which the learner does not use. The same
    holds across learner ranks, each holding whole groups, with ``|U|`` summed over the ranks.
    """
    den = share_units(full, unit)
    return share_units(micro, unit) / den if den else 0.0


def split_groups(batch: TrainBatch, parts: int) -> list[TrainBatch | None]:
    """Whole prompt groups in ``parts`` contiguous shares whose sizes differ by at most one (None: no group left).

    How the driver hands a batch to the learner ranks: a group never straddles two ranks, so every per-group loss
    stays whole, and :func:`share` with units summed over the ranks keeps the sum of the ranks' losses exact.
    """
    return [batch.select_groups(part) if part else None for part in shard(range(batch.num_prompts), parts)]


def right_pad(x: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``[b, r]`` (or ``[b, r, ...]``) on the right of dim 1 to ``[b, width, ...]`` with ``value``.

    Response-block tensors of micro-batches are narrower than the full batch's (trailing padding trimmed) but
    aligned column by column, so padding them back lets them be concatenated into ``[B, R]``.
    """
    if x.shape[1] > width:
        raise ValueError(f"right_pad: tensor is {x.shape[1]} wide, more than {width}")
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)
