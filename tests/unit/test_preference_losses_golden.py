"""Golden tests: the offline preference losses against TRL 1.16.0 on the same random tensors.

- dpo and sppo (hard win probabilities 1 and 0): ``DPOTrainer._compute_loss`` with ``loss_type`` ``"sigmoid"`` and
  ``"sppo_hard"``, through the stub harness of test_losses_golden.py.
- simpo: ``trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"``, ``cpo_alpha=0``.
- orpo: ``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`` (its ``odds_ratio_loss`` and NLL).

For CPO and ORPO the trainer's own ``concatenated_forward``, ``get_batch_logps`` and loss method run, on a
``SimpleNamespace`` standing in for ``self``, with a model that returns fixed logits: TRL takes the log-probs from
the logits (length-normalised where it does) and we take ours from the same logits, so the comparison covers the
reduction, not only the last formula. SPPO with soft probabilities, which TRL does not have, is checked against
the SPPO paper's formula in test_preference_losses.py.
"""

from __future__ import annotations

import os
from types import MethodType, SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import; these tests know

# The pinned-version gate and the stubs are shared with the RLOO / DPO goldens: a missing or different TRL skips or
# fails this file the same way.
from tests.unit.test_losses_golden import TOL, _OneProcessAccelerator, _trl_dpo, missing_internals  # noqa: E402
from tests.unit.test_losses_golden import _pairs as _trl_layout_pairs  # noqa: E402

TRL_INTERNALS = (
    "trl.trainer.dpo_trainer:DPOTrainer._compute_loss",
    "trl.experimental.cpo.cpo_trainer:CPOTrainer.get_batch_loss_metrics",
    "trl.experimental.cpo.cpo_trainer:CPOTrainer.concatenated_forward",
    "trl.experimental.cpo.cpo_trainer:CPOTrainer.cpo_loss",
    "trl.experimental.cpo.cpo_trainer:CPOTrainer.get_batch_logps",
    "trl.experimental.orpo.orpo_trainer:ORPOTrainer.get_batch_loss_metrics",
    "trl.experimental.orpo.orpo_trainer:ORPOTrainer.concatenated_forward",
    "trl.experimental.orpo.orpo_trainer:ORPOTrainer.odds_ratio_loss",
    "trl.experimental.orpo.orpo_trainer:ORPOTrainer.get_batch_logps",
)
if _missing := missing_internals(TRL_INTERNALS):
    pytest.fail(f"trl internals the preference goldens call are gone: {_missing}", pytrace=False)

from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

from eva_ray.losses import get_loss, token_logprobs  # noqa: E402


def _to_groups(p: int) -> torch.Tensor:
    """Rows of TRL's [all chosen; all rejected] layout in our grouped order [c0, r0, c1, r1, ...]."""
    return torch.stack([torch.arange(p), torch.arange(p) + p], dim=1).reshape(-1)


def _chosen_first(p: int, dtype) -> torch.Tensor:
    """Rewards [P, 2] that make the first response of every group the chosen one."""
    return torch.tensor([[1.0, 0.0]] * p, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# dpo and sppo: DPOTrainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, loss_type, beta", [("dpo", "sigmoid", 0.05), ("sppo", "sppo_hard", 0.3)])
def test_dpo_and_hard_sppo_match_trl_dpo_trainer(dtype, name, loss_type, beta):
    p = 5
    per_token, mask, ref_token = _trl_layout_pairs(p, 6, dtype, seed=20)
    ref_seq = (ref_token * mask).sum(-1)
    trl_loss, metrics = _trl_dpo(per_token, mask, ref_seq[:p], ref_seq[p:], beta=beta, loss_type=loss_type)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    rows = _to_groups(p)
    loss, stats = get_loss(name).loss_fn(per_token[rows], ref_token[rows], mask[rows], _chosen_first(p, dtype),
                                         beta=beta)
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])
    for ours, theirs in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies")]:
        assert stats[ours].item() == pytest.approx(metrics[theirs][-1], rel=1e-5, abs=1e-6), ours


# --------------------------------------------------------------------------------------------------------------
# simpo and orpo: CPOTrainer / ORPOTrainer on logits
# --------------------------------------------------------------------------------------------------------------


def _logit_batch(p: int, t: int, vocab: int, dtype, seed: int, equal_chosen: bool):
    """Logits [2P, 1 + T, V] (leaf) and labels for TRL's concatenated layout, chosen rows first.

    Position 0 is a one-token prompt (label -100, attended); responses fill positions 1..len; padding after (label
    -100, not attended). With ``equal_chosen`` every chosen response has the full length T.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * p, 1 + t, vocab, generator=g, dtype=dtype).requires_grad_()
    ids = torch.randint(1, vocab, (2 * p, 1 + t), generator=g)
    lengths = torch.randint(1, t + 1, (2 * p,), generator=g)
    if equal_chosen:
        lengths[:p] = t
    attended = torch.arange(1 + t)[None, :] <= lengths[:, None]
    labels = ids.masked_fill(~attended, -100)
    labels[:, 0] = -100
    return logits, ids.masked_fill(~attended, 0), attended.long(), labels


def _trl_batch_loss(trainer_cls, loss_method: str, logits, input_ids, attention_mask, labels, **attrs):
    """``trainer_cls.get_batch_loss_metrics`` on a stand-in ``self`` whose model returns ``logits``."""
    concatenated = {"concatenated_input_ids": input_ids, "concatenated_attention_mask": attention_mask,
                    "concatenated_labels": labels}
    stub = SimpleNamespace(is_encoder_decoder=False, aux_loss_enabled=False, accelerator=_OneProcessAccelerator(),
                           pad_token_id=0, padding_value=0, concatenated_inputs=lambda batch, **kw: dict(concatenated),
                           get_batch_logps=trainer_cls.get_batch_logps, **attrs)
    stub.concatenated_forward = MethodType(trainer_cls.concatenated_forward, stub)
    setattr(stub, loss_method, MethodType(getattr(trainer_cls, loss_method), stub))

    def model(input_ids, attention_mask=None, use_cache=None, **kwargs):
        return SimpleNamespace(logits=logits)

    half = logits.shape[0] // 2
    return trainer_cls.get_batch_loss_metrics(stub, model, {"chosen_labels": labels[:half]})


def _ours(name: str, logits, labels, p: int, **kw):
    """Our loss from the same logits: per-token log-probs of the response tokens, grouped [c0, r0, c1, ...]."""
    rows = _to_groups(p)
    targets = labels[:, 1:]
    token_lp = token_logprobs(logits[:, :-1], targets.clamp(min=0))
    mask = targets != -100
    return get_loss(name).loss_fn(token_lp[rows], None, mask[rows], _chosen_first(p, logits.dtype), **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta, gamma", [(10.0, 5.0), (2.0, 0.5)])
def test_simpo_matches_trl_cpo_trainer(dtype, beta, gamma):
    p = 6
    logits, ids, attention, labels = _logit_batch(p, 7, 13, dtype, seed=21, equal_chosen=False)
    trl_loss, metrics = _trl_batch_loss(CPOTrainer, "cpo_loss", logits, ids, attention, labels, loss_type="simpo",
                                        cpo_alpha=0.0, alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    loss, stats = _ours("simpo", logits, labels, p, beta=beta, simpo_gamma=gamma)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, trl_loss.to(dtype), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(grad, trl_grad, rtol=TOL[dtype], atol=TOL[dtype])
    for ours, theirs in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        assert stats[ours].item() == pytest.approx(metrics[theirs], rel=1e-5, abs=1e-6), ours


# ORPOTrainer.odds_ratio_loss casts the log-probs to float32, so the comparison is in float32.
ORPO_TOL = 1e-5


@pytest.mark.parametrize("lam", [0.5, 0.1])
def test_orpo_matches_trl_orpo_trainer(lam):
    """Equal chosen lengths: TRL's NLL (the mean over all chosen tokens of the batch) is then our mean over pairs
    of each chosen response's mean NLL."""
    p = 6
    logits, ids, attention, labels = _logit_batch(p, 7, 13, torch.float32, seed=22, equal_chosen=True)
    trl_loss, metrics = _trl_batch_loss(ORPOTrainer, "odds_ratio_loss", logits, ids, attention, labels, beta=lam)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    loss, stats = _ours("orpo", logits, labels, p, beta=lam)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, trl_loss, rtol=ORPO_TOL, atol=ORPO_TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=ORPO_TOL, atol=ORPO_TOL)
    for ours, theirs in [("nll", "nll_loss"), ("log_odds", "log_odds_chosen"), ("log_sigmoid_odds", "log_odds_ratio"),
                         ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies")]:
        assert stats[ours].item() == pytest.approx(metrics[theirs], rel=ORPO_TOL, abs=ORPO_TOL), ours


def test_orpo_nll_per_response_is_where_we_differ_from_trl():
    """Chosen responses of different lengths: TRL averages the NLL over all chosen tokens of the batch (a long
    response weighs more, and the term couples the pairs); ours averages each response's NLL, then the pairs, so a
    pair's loss is its own (the learner's micro-batches split the batch by pairs). The odds-ratio term agrees."""
    p, lam = 6, 0.5
    logits, ids, attention, labels = _logit_batch(p, 7, 13, torch.float32, seed=23, equal_chosen=False)
    trl_loss, metrics = _trl_batch_loss(ORPOTrainer, "odds_ratio_loss", logits, ids, attention, labels, beta=lam)
    loss, stats = _ours("orpo", logits, labels, p, beta=lam)
    assert abs(stats["nll"].item() - metrics["nll_loss"]) > 1e-3
    odds_term, trl_odds_term = loss.item() - stats["nll"].item(), trl_loss.item() - metrics["nll_loss"]
    assert odds_term == pytest.approx(trl_odds_term, rel=ORPO_TOL, abs=ORPO_TOL)
