"""eva_ray.batching: the padded layout, whole-group micro-batches, and exact share-weighted accumulation."""

from __future__ import annotations

import random

import pytest
import torch

from eva_ray.batching import (
    collate,
    groups_with_spread,
    micro_batches,
    right_pad,
    select_pairs,
    share,
)
from eva_ray.losses import oaif_loss, rloo_loss, token_logprobs
from eva_ray.rollouts import Rollout

PAD = 0


def group(prompt_id: str, prompt: list[int], responses: list[list[int]], version: int = 0) -> list[Rollout]:
    return [Rollout(prompt_id, prompt, resp, "", "stop", version) for resp in responses]


def random_groups(seed: int, num_prompts: int, n: int, vocab: int = 100) -> list[list[Rollout]]:
    rng = random.Random(seed)
    out = []
    for p in range(num_prompts):
        prompt = [rng.randrange(7, vocab) for _ in range(rng.randint(1, 9))]
        out.append(group(f"p{p}", prompt, [[rng.randrange(7, vocab) for _ in range(rng.randint(0, 7))]
                                           for _ in range(n)], version=rng.randint(0, 3)))
    return out


def test_collate_lays_out_a_hand_built_batch():
    groups = [group("a", [11, 12, 13], [[21, 22], [23]], version=4),
              group("b", [14], [[24, 25, 26], []], version=5)]
    b = collate(groups, [[1.0, 0.0], [0.5, float("nan")]], pad_token_id=PAD)
    # W = 3 (longest prompt), R = 3 (longest response), L = 6.
    assert b.prompt_width == 3 and b.response_width == 3
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 0],
                                     [11, 12, 13, 23, 0, 0],
                                     [0, 0, 14, 24, 25, 26],
                                     [0, 0, 14, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [0, 0, 1, 1, 1, 1],
                                         [0, 0, 1, 0, 0, 0]]
    # Positions count real tokens, so the left-padded prompt "b" starts at position 0 like an unpadded one.
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4],
                                       [0, 1, 2, 3, 3, 3],
                                       [0, 0, 0, 1, 2, 3],
                                       [0, 0, 0, 0, 0, 0]]
    # response_mask[:, t] says whether logits at position t predict a response token (input column t + 1).
    assert b.response_mask.int().tolist() == [[0, 0, 1, 1, 0],
                                              [0, 0, 1, 0, 0],
                                              [0, 0, 1, 1, 1],
                                              [0, 0, 0, 0, 0]]
    assert b.response_ids.tolist() == [[21, 22, 0], [23, 0, 0], [24, 25, 26], [0, 0, 0]]
    assert b.response_token_mask.int().tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert b.num_response_tokens == 6 and b.num_sequences == 4 and b.num_prompts == 2 and b.group_size == 2
    assert b.policy_versions.tolist() == [4, 4, 5, 5]
    assert b.prompt_ids == ("a", "b")
    assert b.rewards.dtype == torch.float32 and b.rewards[0].tolist() == [1.0, 0.0] and b.rewards[1, 1].isnan()
    # The mask marks exactly the positions whose next token is a response token.
    next_is_response = torch.zeros_like(b.response_mask)
    for i, (p, r) in enumerate(zip(b.prompt_lengths.tolist(), b.response_lengths.tolist())):
        next_is_response[i, b.prompt_width - 1:b.prompt_width - 1 + r] = True
    assert torch.equal(b.response_mask, next_is_response)


@pytest.mark.parametrize("bad, message", [
    (dict(groups=[], rewards=[]), "no prompt groups"),
    (dict(groups=[group("a", [1], [[2], [3]]), group("b", [1], [[2]])], rewards=[[0, 1], [0, 1]]),
     "same number of responses"),
    (dict(groups=[group("a", [1], [[2]]) + group("b", [1], [[3]])], rewards=[[0, 1]]), "mixes prompts"),
    (dict(groups=[group("a", [], [[2], [3]])], rewards=[[0, 1]]), "has no tokens"),
    (dict(groups=[group("a", [1], [[2], [3]])], rewards=[[0, 1, 2]]), r"\[P, N\]"),
])
def test_collate_rejects_malformed_groups(bad, message):
    with pytest.raises(ValueError, match=message):
        collate(bad["groups"], bad["rewards"], PAD)


def test_select_groups_trims_padding_and_keeps_response_columns_aligned():
    b = collate(random_groups(0, 6, 3), torch.randn(6, 3), PAD)
    sub = b.select_groups([4, 1])
    rows = [4 * 3 + j for j in range(3)] + [1 * 3 + j for j in range(3)]
    assert sub.prompt_ids == (b.prompt_ids[4], b.prompt_ids[1])
    assert torch.equal(sub.rewards, b.rewards[[4, 1]])
    assert sub.prompt_width == int(sub.prompt_lengths.max()) and sub.response_width == int(sub.response_lengths.max())
    # Column j of the response block is response token j in both: padding the sub-batch back gives the full rows.
    assert torch.equal(right_pad(sub.response_ids, b.response_width, PAD), b.response_ids[rows])
    assert torch.equal(right_pad(sub.response_token_mask, b.response_width, False), b.response_token_mask[rows])
    # Real tokens, positions and masks survive the trim unchanged.
    for i, r in enumerate(rows):
        real = b.attention_mask[r].bool()
        assert torch.equal(sub.input_ids[i][sub.attention_mask[i].bool()], b.input_ids[r][real])
        assert torch.equal(sub.position_ids[i][sub.attention_mask[i].bool()], b.position_ids[r][real])
    assert sub.response_mask.shape == (6, sub.input_ids.shape[1] - 1)


@pytest.mark.parametrize("size, expected", [(8, [2, 2, 1]), (4, [1, 1, 1, 1, 1]), (3, [1] * 5), (100, [5])])
def test_micro_batches_hold_whole_groups_in_order(size, expected):
    b = collate(random_groups(1, 5, 4), torch.randn(5, 4), PAD)
    micros = micro_batches(b, size)
    assert [m.num_prompts for m in micros] == expected
    assert all(m.num_sequences == 4 * m.num_prompts for m in micros)
    assert sum((m.prompt_ids for m in micros), ()) == b.prompt_ids
    assert torch.equal(torch.cat([right_pad(m.response_ids, b.response_width, PAD) for m in micros]), b.response_ids)
    for unit in ("sequence", "token", "group"):
        assert sum(share(m, b, unit) for m in micros) == pytest.approx(1.0)


def _accumulated(loss_fn, b, micros, unit, lp, ref, **kw):
    """sum_k share_k * loss(micro k), with each micro's slice of the full [B, R] log-probs."""
    total, row = 0.0, 0
    for m in micros:
        rows, r = slice(row, row + m.num_sequences), m.response_width
        row += m.num_sequences
        loss, _ = loss_fn(lp[rows, :r], ref[rows, :r], m.response_token_mask, m.rewards, **kw)
        total = total + share(m, b, unit) * loss
    return total


@pytest.mark.parametrize("aggregation, kl_mode", [("sequence", "reward"), ("sequence", "loss"),
                                                  ("token", "reward"), ("token", "loss")])
def test_share_weighted_micro_batches_give_the_full_batch_rloo_loss_and_gradient(aggregation, kl_mode):
    torch.manual_seed(0)
    b = collate(random_groups(2, 6, 4), torch.randn(6, 4), PAD)
    b.rewards[2, 1] = float("nan")  # an unscored response stays unscored in its micro-batch
    shape = b.response_ids.shape
    base = torch.randn(shape, dtype=torch.float64) - 2
    ref = base + 0.1 * torch.randn(shape, dtype=torch.float64)
    kw = dict(beta=0.1, kl_estimator="k3", kl_mode=kl_mode, aggregation=aggregation)
    lp_full = base.clone().requires_grad_(True)
    full, _ = rloo_loss(lp_full, ref, b.response_token_mask, b.rewards, **kw)
    full.backward()
    lp_acc = base.clone().requires_grad_(True)
    acc = _accumulated(rloo_loss, b, micro_batches(b, 8), aggregation, lp_acc, ref, **kw)
    acc.backward()
    assert acc.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(lp_acc.grad, lp_full.grad, rtol=1e-10, atol=1e-12)


def test_select_pairs_keeps_best_and_worst_and_oaif_loss_is_unchanged():
    torch.manual_seed(0)
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3],     # chosen 1, rejected 0
                            [0.2, 0.2, 0.2, 0.2],     # tie: no pair
                            [float("nan"), 1.0, 0.0, 2.0],  # chosen 3, rejected 2 (NaN ignored)
                            [0.0, float("nan"), float("nan"), float("nan")]])  # one finite reward: no pair
    b = collate(random_groups(3, 4, 4), rewards, PAD)
    assert groups_with_spread(b.rewards).tolist() == [True, False, True, False]
    pairs = select_pairs(b)
    assert pairs.prompt_ids == (b.prompt_ids[0], b.prompt_ids[2]) and pairs.group_size == 2
    assert torch.allclose(pairs.rewards, torch.tensor([[0.9, 0.1], [2.0, 0.0]]))
    for i, row in enumerate([1, 0, 11, 10]):
        assert torch.equal(pairs.input_ids[i][pairs.attention_mask[i].bool()],
                           b.input_ids[row][b.attention_mask[row].bool()])
    # DPO on the pair batch equals DPO on the whole batch (same pairs, same mean), share-weighted or not.
    lp = torch.randn(b.response_ids.shape, dtype=torch.float64) - 2
    ref = lp + 0.2 * torch.randn_like(lp)
    full, stats = oaif_loss(lp, ref, b.response_token_mask, b.rewards, beta=0.1)
    rows = torch.tensor([1, 0, 11, 10])
    r = pairs.response_width
    sub, sub_stats = oaif_loss(lp[rows, :r], ref[rows, :r], pairs.response_token_mask, pairs.rewards, beta=0.1)
    assert sub.item() == pytest.approx(full.item(), rel=1e-12) and stats["n_pairs"] == sub_stats["n_pairs"] == 2
    with pytest.raises(ValueError, match="no prompt"):
        select_pairs(b.select_groups([1, 3]))


def _response_logprobs(model, b, logits_to_keep: bool) -> torch.Tensor:
    """[B, R] log-probs of the response tokens, the way the learner computes them."""
    kwargs = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    if logits_to_keep:
        logits = model(**kwargs, logits_to_keep=b.response_width + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, b.prompt_width - 1:-1]
    lp = token_logprobs(logits, b.response_ids)
    return torch.where(b.response_token_mask, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_padding_does_not_change_log_probs_of_a_real_model(logits_to_keep):
    from eva_ray.tiny import char_tokenizer, tiny_policy

    model = tiny_policy(char_tokenizer(), seed=0).eval()
    groups = random_groups(4, 3, 3)
    b = collate(groups, torch.zeros(3, 3), PAD)
    with torch.no_grad():
        batched = _response_logprobs(model, b, logits_to_keep)
        for p, g in enumerate(groups):
            for j, rollout in enumerate(g):
                single = collate([[rollout]], [[0.0]], PAD)  # no padding at all
                alone = _response_logprobs(model, single, logits_to_keep)[0]
                r = len(rollout.response_token_ids)
                row = batched[p * 3 + j]
                assert torch.allclose(row[:r], alone[:r], atol=1e-5, rtol=0), (p, j)
                assert torch.all(row[r:] == 0)
    assert (b.attention_mask == 0).any()  # the batch really was padded, on both sides
    assert (b.attention_mask[:, 0] == 0).any() and (b.attention_mask[:, -1] == 0).any()
