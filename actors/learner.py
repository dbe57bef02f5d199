"""Learner: the solver policy inside a DeepSpeed engine, a frozen reference model, and one RLOO / OAIF step per batch.

A plain class: Ray wraps it at launch (``ray.remote(Learner)``); tests and single-GPU runs call it inline.

    learner = Learner("runs/tiny/policy", solver=cfg.solver, learner=cfg.learner, model=cfg.model,
                      total_steps=cfg.run.total_steps, seed=cfg.run.seed, temperature=cfg.rollout.temperature)
    batch = collate(groups, rewards, pad_token_id)         # eva_ray.batching
    metrics = learner.train_step(batch)                    # {"train/loss": ..., "timing/learner_s": ...}
    spec = learner.open_weight_channel(host, world_size, bucket_bytes=64 << 20, timeout_s=300)   # once, then
    learner.join_weight_channel()                          # with every rollout worker at once (a collective)
    learner.push_weights()                                 # each sync: buckets over the channel, see weight_channel
    learner.save("runs/x/checkpoint-100"); learner.close()

One ``train_step``:

1. Skip (``train/skipped=1``, weights and Adam state untouched) when no prompt group has reward spread and
   ``solver.skip_zero_advantage`` is set, or always for a loss on pairs (OAIF: no pair, nothing to learn). Adam
   keeps moving the weights on a zero or KL-only gradient through its momentum, which can collapse a small policy.
2. The loss's spec (:mod:`eva_ray.losses.registry`) picks the batch view: OAIF's ``"pairs"`` keeps only the best
   and worst response of each prompt (``select_pairs``), so the policy and the reference model run on 2 responses
   per prompt instead of N.
3. Reference log-probs, once (no grad), when the spec needs the reference at this beta (RLOO at ``beta == 0``
   has no reference model at all).
4. ``solver.updates_per_batch`` optimizer updates. Micro-batches of whole prompt groups run forward/backward, each
   loss weighted by its share of the batch (``eva_ray.batching.share``: exact for these per-group losses), and one
   ``engine.step()``. With one update per batch (the usual case) that is the whole step: the metrics come from the
   micro-batches' own forward passes, and a non-finite loss is back-propagated and refused with its gradient (a
   non-finite gradient norm skips the step: DeepSpeed's ZeRO 1-3 optimizers refuse it themselves; under ZeRO-0 the
   learner checks, and also refuses a step in which any rank saw a non-finite loss). With several updates per
   batch each starts with a no-grad pass over the batch at the weights it starts from: its log-probs are the
   ratio's *old* log-probs (first update, fixed for the batch; clipped with ``clip_eps``) and the source of the
   reward-side KL, its full-batch loss is checked for NaN/inf before any gradient reaches the engine, and its
   stats are the step's metrics. Those are the learner's log-probs at the start of the step, not the sampler's.
   Rollouts that lag the learner's policy (``run.overlap``) are corrected apart, token by token, with importance
   weights from the rollout engine's own log-probs (``learner.off_policy_correction``,
   :mod:`eva_ray.losses.off_policy`), logged as ``train/is_*``.
5. Metrics (``train/...``) describe the batch at the weights before the step. ``version`` counts applied
   optimizer updates; the LR schedule counts updates too, skipped ones included, so it stays keyed to the
   driver's step.

The modules beside this one hold the rest of the learner: ``learner_setup`` (DeepSpeed, the process group and the
process-wide state a learner sets and undoes, models, optimizer), ``learner_weights`` (weight export and the weight
channel) and ``learner_checkpoint`` (resumable checkpoints).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from actors.learner_checkpoint import CheckpointIO
from actors.learner_setup import (CreatedGroup, _ds_config, _forward_parameters, _import_deepspeed, _load_causal_lm,
                                  _make_optimizer, _param_groups, _reference_ds_config, _restore_linear,
                                  join_process_group, leave_process_group)
from actors.learner_weights import WeightExport
from actors.weight_channel import ChannelSpec, WeightChannel
from eva_ray.batching import TrainBatch, batch_view, groups_with_spread, micro_batches, right_pad, share_units
from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig
from eva_ray.dtypes import COMPUTE_DTYPES, torch_dtypes
from eva_ray.losses import entropy_from_logits, get_loss, kl_estimate, masked_mean, token_logprobs
from eva_ray.losses.off_policy import Correction, importance_weights
from eva_ray.lr_schedule import lr_multiplier
from eva_ray.metrics import reduce_rank_metrics, weighted_means

DTYPES: dict[str, torch.dtype] = torch_dtypes(COMPUTE_DTYPES)


# ------------------------------------------------------------------------------------------------------ learner


class Learner(WeightExport, CheckpointIO):
    """The solver policy under DeepSpeed (ZeRO 0-3), its frozen reference model, and the RLOO / OAIF update.

    Args:
        model_path: the policy's starting weights (a local HF folder or hub id).
        solver: the loss and its knobs (``algorithm``, ``beta``, ``kl_estimator``, ``kl_mode``, ``aggregation``,
            ``clip_eps``, ``updates_per_batch``, ``dpo_loss``, ``skip_zero_advantage``).
        learner: optimiser, schedule, ZeRO stage, micro-batch size, gradient checkpointing.
        model: ``dtype``, ``reference`` (defaults to ``model_path``), ``tokenizer`` (for ``save``; defaults to
            ``model_path``), ``trust_remote_code``. Its ``path`` is not read: ``model_path`` is.
        total_steps: ``train_step`` calls the run will make; the LR schedule spans
            ``total_steps * solver.updates_per_batch`` optimizer updates.
        seed: seeds torch (the update itself is deterministic: dropout is off).
        device: ``None`` picks ``cuda`` when available, else the CPU. CUDA uses NCCL, the CPU gloo.
        temperature: the rollout's sampling temperature; log-probs are taken under ``softmax(logits / T)``, the
            distribution the responses were drawn from (pass ``cfg.rollout.temperature``).
    """

    def __init__(self, model_path: str, *, solver: SolverConfig, learner: LearnerConfig, model: ModelConfig,
                 total_steps: int, seed: int, device: str | torch.device | None = None,
                 temperature: float = 1.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        spec = get_loss(solver.algorithm)
        if (problem := spec.check_beta(solver.beta)) is not None:
            raise ValueError(problem)
        if model.dtype not in DTYPES:
            raise ValueError(f"model.dtype: {model.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.solver, self.cfg, self.model_cfg = solver, learner, model
        self.model_path = model_path
        self.temperature = float(temperature)
        self.total_updates = total_steps * solver.updates_per_batch
        self._spec = spec
        self._loss_fn = spec.loss_fn
        self._loss_options = spec.options_for(solver)
        # The importance ratio pi / pi_old is used only when one batch gets several updates. With one update the
        # ratio is exactly 1 and its gradient equals REINFORCE's, but its value would make train/loss read
        # -mean(A) = 0 every step; the plain -mean(A * log pi) keeps a loss that falls as the policy learns.
        self._use_ratio = spec.ratio and solver.updates_per_batch > 1
        # "auto" is resolved by the driver (TIS when rollout overlaps training); a learner built directly has no lag
        # to correct unless asked.
        method = learner.off_policy_correction if learner.off_policy_correction != "auto" else "none"
        self._correction = Correction(method if spec.importance_weights else "none", cap=learner.is_cap,
                                      low=learner.icepop_low, high=learner.icepop_high)
        self._version = 0
        self._closed = False
        self._created_group: CreatedGroup | None = None
        self._channel: WeightChannel | None = None
        self._channel_store: Any = None
        self._channel_spec: ChannelSpec | None = None
        requested = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(seed)

        deepspeed = _import_deepspeed(requested)
        self._deepspeed = deepspeed
        self._created_group = join_process_group(deepspeed, requested)
        self._rank = torch.distributed.get_rank()
        self._world = torch.distributed.get_world_size()
        dtype = DTYPES[model.dtype]
        ds_config = _ds_config(learner, dtype)
        self._dtype, self._ds = dtype, ds_config  # begin_iteration loads a new reference the same way

        self._hf_ds_config: Any = None
        try:
            self.reference = None
            if learner.zero_stage < 3:
                self.reference = self._load_reference(model.reference or model_path, dtype)
            # ZeRO-3: HfDeepSpeedConfig must exist before from_pretrained so the policy is built under zero.Init and
            # loaded straight into partitions. transformers holds it by weakref only, so self keeps it; once the
            # engine exists the global is unset again, so models loaded later in this process (an inline rollout
            # worker, a test's fresh model) are ordinary modules. The engine never consults transformers' copy.
            if learner.zero_stage == 3:
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_ds_config = HfDeepSpeedConfig(ds_config)
                # The reference is partitioned over the ranks like the policy (an inference-only engine), never a
                # full copy per rank.
                reference = self._load_reference(model.reference or model_path, dtype)
                if reference is not None:
                    self.reference = deepspeed.initialize(model=reference,
                                                          config=_reference_ds_config(ds_config))[0]
                    self.reference.eval()
            policy = _load_causal_lm(model_path, dtype, model.trust_remote_code)
            if learner.gradient_checkpointing:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._logits_to_keep = "logits_to_keep" in _forward_parameters(policy)
            optimizer = _make_optimizer(_param_groups(policy, learner.weight_decay), learner)
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_multiplier(learner.lr_schedule, self.total_updates, learner.warmup_ratio))
            self._client_optimizer = optimizer
            self.engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                                        lr_scheduler=self._scheduler, config=ds_config)
        except BaseException:
            self._release()
            raise
        finally:
            if learner.zero_stage == 3:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
        # Train mode (gradient checkpointing only runs in it); with dropout at 0 it computes what eval mode does.
        self.engine.train()
        self.device: torch.device = torch.device(self.engine.device)
        if self.reference is not None and self.cfg.zero_stage < 3:
            self.reference.to(self.device)

    def _load_reference(self, path: str, dtype: torch.dtype) -> torch.nn.Module | None:
        """The frozen reference model, or None when the loss never reads it (e.g. RLOO with ``beta == 0``).

        Under ZeRO 0-2 a plain replicated module in eval mode without gradients, loaded *before* any
        HfDeepSpeedConfig exists (while one is alive, every from_pretrained in the process builds a
        ZeRO-3-partitioned model, which only a DeepSpeed engine can run). Under ZeRO-3 it is loaded while one is
        alive and wrapped in an inference engine, so it is partitioned over the ranks.
        """
        if not self._spec.needs_reference(self.solver.beta):
            return None
        reference = _load_causal_lm(path, dtype, self.model_cfg.trust_remote_code)
        return reference.requires_grad_(False).eval()

    # ------------------------------------------------------------------------------------------ iterations

    def begin_iteration(self, updates: int, reference_path: str | None = None) -> dict[str, float]:
        """Start an iteration of offline training (each one the paper runs as a training job of its own).

        The optimizer's state is zeroed in place (moments and step count: what a freshly built optimizer holds, and
        every reference DeepSpeed keeps to it stays valid), the LR schedule starts again over ``updates`` optimizer
        updates with ``learner.lr_schedule`` and ``warmup_ratio``, and the frozen reference becomes the model saved
        at ``reference_path`` (the policy the iteration starts from) when the loss reads one. The version keeps
        counting across iterations. A collective: every rank calls it.
        """
        if self._closed:
            raise RuntimeError("begin_iteration on a closed learner")
        if updates < 1:
            raise ValueError(f"updates must be >= 1, got {updates}")
        for state in self._client_optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)
        self.total_updates = updates
        factor = lr_multiplier(self.cfg.lr_schedule, updates, self.cfg.warmup_ratio)
        self._scheduler.lr_lambdas = [factor] * len(self._client_optimizer.param_groups)
        self._scheduler.last_epoch = 0
        for group, base in zip(self._client_optimizer.param_groups, self._scheduler.base_lrs):
            group["lr"] = base * factor(0)
        if reference_path is not None and self.reference is not None:
            self._replace_reference(reference_path)
        return {"version": float(self._version), "lr": self.lr}

    def _replace_reference(self, path: str) -> None:
        """Load the reference from ``path`` as ``__init__`` does (a plain module, or ZeRO-3 partitions)."""
        old, self.reference = self.reference, None
        if old is not None and hasattr(old, "destroy"):
            old.destroy()
        del old
        gc.collect()
        if self.cfg.zero_stage < 3:
            self.reference = self._load_reference(path, self._dtype).to(self.device)
            return
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        keep = HfDeepSpeedConfig(self._ds)  # alive while the reference is built, as in __init__
        try:
            reference = self._load_reference(path, self._dtype)
            self.reference = self._deepspeed.initialize(model=reference, config=_reference_ds_config(self._ds))[0]
            self.reference.eval()
        finally:
            del keep
            unset_hf_deepspeed_config()

    # ------------------------------------------------------------------------------------------ properties

    @property
    def version(self) -> int:
        """Optimizer updates applied so far (0: the starting weights). Rollouts carry it as ``policy_version``."""
        return self._version

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer update will use."""
        return float(self._client_optimizer.param_groups[0]["lr"])

    # --------------------------------------------------------------------------------------- forward passes

    def _response_logits(self, model: Callable[..., Any], batch: TrainBatch) -> torch.Tensor:
        """``[b, R, V]`` logits at positions ``W - 1 .. L - 2``, the ones that predict ``batch.response_ids``."""
        kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                  "position_ids": batch.position_ids, "use_cache": False}
        width = batch.response_width
        if self._logits_to_keep:
            # The last R + 1 positions only: on a long prompt this is most of the logits memory saved. (R + 1 >= 1;
            # 0 would mean "all" to HF.)
            logits = model(**kwargs, logits_to_keep=width + 1).logits
            return logits[:, :-1]
        logits = model(**kwargs).logits
        return logits[:, batch.prompt_width - 1:-1]

    def _logprobs(self, model: Callable[..., Any], batch: TrainBatch,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([b, R] token log-probs of the responses, [b, R] entropies or None)``."""
        logits = self._response_logits(model, batch)
        lp = token_logprobs(logits, batch.response_ids, self.temperature)
        ent = entropy_from_logits(logits.detach(), self.temperature) if with_entropy else None
        return lp, ent

    @torch.no_grad()
    def sequence_logprobs(self, batch: TrainBatch) -> list[float]:
        """``log pi(response | prompt)`` of every row of ``batch`` at the current weights and the sampling
        temperature, by teacher forcing: a world's exact expected accuracy is the mean of its exp over the answers.
        Every rank computes the whole batch, so ZeRO-3's gathers line up."""
        out: list[float] = []
        for micro in micro_batches(batch.to(self.device), self.cfg.micro_batch_size):
            lp, _ = self._logprobs(self.engine, micro)
            out.extend((lp * micro.response_token_mask).sum(dim=1).tolist())
        return out

    @torch.no_grad()
    def _batch_logprobs(self, model: Callable[..., Any], micros: list[TrainBatch], width: int, n_micro: int,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """No-grad log-probs (and entropies) of the whole batch, micro-batch by micro-batch, as ``[B, R]``.

        Passes past this rank's own micro-batches (up to ``n_micro``) repeat its first one and are dropped: under
        ZeRO-3 every forward gathers parameters with the other ranks, so all ranks run the same number.
        """
        for _ in range(len(micros), n_micro):
            self._logprobs(model, micros[0])
        lps, ents = [], []
        for mb in micros:
            lp, ent = self._logprobs(model, mb, with_entropy)
            lps.append(right_pad(lp.float(), width))
            if ent is not None:
                ents.append(right_pad(ent.float(), width))
        return torch.cat(lps), (torch.cat(ents) if with_entropy else None)

    def _loss(self, logprobs: torch.Tensor, ref: torch.Tensor | None, old: torch.Tensor | None,
              batch: TrainBatch, is_weights: tuple[torch.Tensor | None, dict[str, torch.Tensor]] = (None, {}),
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kwargs = dict(self._loss_options)
        if self._spec.ratio:
            kwargs.update(old_logprobs=old, clip_eps=self.solver.clip_eps)
        weights, is_stats = is_weights
        if self._spec.importance_weights:
            kwargs["is_weights"] = weights
        loss, stats = self._loss_fn(logprobs, ref, batch.response_token_mask, batch.rewards, beta=self.solver.beta,
                                    **kwargs)
        return loss, stats | is_stats

    # ------------------------------------------------------------------------------------------ train step

    def train_step(self, batch: TrainBatch, *, padding_only: bool = False) -> dict[str, float]:
        """Train on one batch (see the module docstring); returns ``train/*`` and ``timing/*`` metrics.

        Always present: ``train/skipped`` (1 when no update was applied), ``train/nonfinite_loss``,
        ``train/nonfinite_grad``, ``train/updates``, ``train/version``, ``train/lr``, ``train/tokens`` (response
        tokens trained on), ``train/sequences``, ``train/spread_fraction`` (prompts with reward spread),
        ``train/reward_mean``, ``train/staleness_mean`` / ``_max`` (learner version minus the rollouts' versions),
        ``timing/learner_s``. After a forward pass also ``train/loss``, ``train/kl``, ``train/entropy``,
        ``train/grad_norm`` and the loss's own stats (RLOO: ``advantage_std``, ``clip_fraction``, ...; OAIF:
        ``n_pairs``, ``rewards_margin``, ``rewards_accuracy``, ...), all at the weights before the step.

        With several ranks each gets its share of whole prompt groups (``launch/learner_group.py``); a rank left
        without any gets one group to compute on with ``padding_only=True``, which contributes nothing. Every
        decision (skip, a non-finite loss) is taken together, every rank runs as many micro-batches as the busiest
        (ZeRO-3's gathers must line up), losses are weighted by their share of the *global* batch, and the returned
        metrics are the global ones, the same on every rank.
        """
        if self._closed:
            raise RuntimeError("train_step on a closed learner")
        start = time.perf_counter()
        s = self.solver
        real = not padding_only
        self._step_version = self._version  # a rollout lags when older than the weights the step starts from
        spread = groups_with_spread(batch.rewards) & real
        finite = torch.isfinite(batch.rewards) & real
        staleness = (self._version - batch.policy_versions).float()
        metrics: dict[str, float] = {
            "train/lr": self.lr,
            "train/spread_fraction": spread.float().mean().item(),
            "train/reward_mean": batch.rewards[finite].mean().item() if finite.any() else float("nan"),
            "train/staleness_mean": staleness.mean().item(),
            "train/staleness_max": staleness.max().item() if real else 0.0,
            "train/skipped": 1.0, "train/nonfinite_loss": 0.0, "train/nonfinite_grad": 0.0, "train/updates": 0.0,
            "train/tokens": 0.0, "train/sequences": 0.0,
        }
        weights = {"prompts": float(batch.num_prompts * real), "rewards": float(finite.sum()),
                   "sequences": float(batch.num_sequences * real), "units": 0.0}
        if not self._any_rank(bool(spread.any())) and (s.skip_zero_advantage or self._spec.needs_spread):
            # Nothing in the rewards to learn from. The schedule still advances, so the LR stays keyed to the
            # driver's step count rather than to the number of batches that happened to carry a signal.
            self._advance_schedule(s.updates_per_batch)
            return self._finish(metrics, weights, start)

        full = batch_view(batch, self._spec.view).to(self.device)
        unit = self._spec.unit_for(s)
        micros = micro_batches(full, self.cfg.micro_batch_size)
        # A padding rank computes on its filler group like any other, but with nothing of its own to weigh.
        local_units = share_units(full, unit) if real else 0.0
        global_units = self._sum_ranks(local_units)
        weights["units"] = local_units
        n_micro = int(self._max_ranks(float(len(micros))))
        width = full.response_width
        mask = full.response_token_mask
        metrics["train/tokens"] = float(full.num_response_tokens) * real
        metrics["train/sequences"] = float(full.num_sequences) * real
        t0 = time.perf_counter()
        ref = self._batch_logprobs(self.reference, micros, width, n_micro)[0] if self.reference is not None else None
        metrics["timing/learner_ref_s"] = time.perf_counter() - t0

        old: torch.Tensor | None = None
        grad_norms: list[float] = []
        scale = self._world / global_units if real and global_units else 0.0
        for update in range(s.updates_per_batch):
            stats: dict[str, float] | None = None
            if s.updates_per_batch > 1:
                # Several updates: a no-grad pass at the weights this update starts from gives the old log-probs
                # (first update: the ratio's denominators, fixed for the batch), exact full-batch stats, and the
                # NaN check of the loss the micro-batches are about to differentiate.
                current, entropy = self._batch_logprobs(self.engine, micros, width, n_micro,
                                                        with_entropy=update == 0)
                if update == 0:
                    old = current
                loss, full_stats = self._loss(current, ref, old, full, self._is_weights(full, old))
                if update == 0:
                    stats = {k: v.item() for k, v in full_stats.items()}
                    stats["entropy"] = masked_mean(entropy, mask).item()
                    if "kl" not in stats and ref is not None:
                        stats["kl"] = masked_mean(kl_estimate(current, ref, s.kl_estimator), mask).item()
                if self._any_rank(real and not bool(torch.isfinite(loss))):
                    metrics["train/nonfinite_loss"] += 1.0
                    self._advance_schedule(s.updates_per_batch - update)
                    break
            # The micro-batches' stats are the step's metrics only with one update (else the no-grad pass has them).
            applied, grad_norm, nonfinite, micro_stats = self._update(micros, ref, old, unit, n_micro, scale,
                                                                      collect_stats=stats is None and update == 0)
            if update == 0:
                metrics.update({f"train/{k}": v for k, v in (stats or micro_stats).items()})
            metrics["train/nonfinite_loss"] += float(nonfinite)
            grad_norms.append(grad_norm)
            if not applied:
                metrics["train/nonfinite_grad"] += 1.0
                self._advance_schedule(1)  # DeepSpeed does not step the schedule on a skipped update
                continue
            self._version += 1
            metrics["train/updates"] += 1.0
        if grad_norms:
            metrics["train/grad_norm"] = grad_norms[0]
        metrics["train/skipped"] = float(metrics["train/updates"] == 0)
        return self._finish(metrics, weights, start)

    def _is_weights(self, batch: TrainBatch, learner_logprobs: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Importance weights of ``batch``'s tokens for rollouts older than the learner (None when off or 1)."""
        if self._correction.method == "none" or learner_logprobs is None or batch.behaviour_logprobs is None:
            return None, {}
        lagging = batch.policy_versions.to(self.device) < self._step_version
        behaviour = batch.behaviour_logprobs.to(learner_logprobs.device)
        return importance_weights(learner_logprobs, behaviour, lagging, batch.response_token_mask, self._correction)

    def _update(self, micros: list[TrainBatch], ref: torch.Tensor | None, old: torch.Tensor | None, unit: str,
                n_micro: int, scale: float, *, collect_stats: bool = True,
                ) -> tuple[bool, float, bool, dict[str, float]]:
        """One optimizer update over all micro-batches; ``(applied, grad norm before clipping, whether any rank saw
        a non-finite loss, stats)``.

        Each micro-batch's mean loss is weighted by ``scale * (its units)``: with ``scale = world / global units``
        the gradients DeepSpeed averages over the ranks sum to the global batch's. Micro-batches past this rank's
        own (up to ``n_micro``, the busiest rank's count) repeat its first one with weight 0. ``stats`` are the loss
        statistics (and entropy) of this rank's micro-batches at the weights before the update, combined as means
        weighted by units (the loss itself exactly); with one update per batch they are the step's metrics, so no
        extra forward pass is needed for them.
        """
        engine = self.engine
        nonfinite = 0
        offsets = [0]
        for mb in micros:
            offsets.append(offsets[-1] + mb.num_sequences)
        weighted: list[tuple[dict[str, float], float]] = []  # (stats, loss units) per micro-batch (collect_stats)
        for k in range(n_micro):
            mine = k < len(micros)
            mb = micros[k] if mine else micros[0]
            rows = slice(offsets[k], offsets[k + 1]) if mine else slice(0, mb.num_sequences)
            r = mb.response_width
            # Gradients are reduced and partitioned (ZeRO 2/3) at the boundary; only the last micro-batch is one.
            engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            keep = mine and collect_stats
            lp, entropy = self._logprobs(engine, mb, with_entropy=keep)
            mb_old = old[rows, :r] if old is not None else None
            mb_ref = ref[rows, :r] if ref is not None else None
            loss, stats = self._loss(lp, mb_ref, mb_old if self._use_ratio else None, mb,
                                     self._is_weights(mb, mb_old if mb_old is not None else lp.detach()))
            weight = scale * share_units(mb, unit) if mine else 0.0
            # The loss is back-propagated even when non-finite: the gradient-norm check below then refuses the
            # step (under ZeRO 1-3 DeepSpeed does), which keeps the engine's accumulation state consistent where
            # skipping one backward would not. That check replaces the no-grad pass that used to catch it first.
            nonfinite += int(mine and weight > 0 and not torch.isfinite(loss))
            if keep:  # .item() synchronises a GPU: only for the metrics that will be reported
                mask = mb.response_token_mask
                values = {name: v.item() for name, v in stats.items()}
                values["entropy"] = masked_mean(entropy, mask).item()
                if "kl" not in values and mb_ref is not None:  # OAIF's stats carry no KL; drift is worth watching
                    values["kl"] = masked_mean(kl_estimate(lp.detach(), mb_ref, self.solver.kl_estimator),
                                               mask).item()
                weighted.append((values, share_units(mb, unit)))
            # scale_wrt_gas=False: the weight already is the accumulation weight (and gradient_accumulation_steps
            # is 1 anyway). A zero-weight filler pass still runs backward, so every rank reduces together.
            engine.backward(loss * weight if weight else loss.nan_to_num() * 0.0, scale_wrt_gas=False)
        stats = weighted_means(weighted)
        refuse = self._any_rank(nonfinite > 0)
        if self.cfg.zero_stage == 0:
            # ZeRO-0 hands the plain torch optimizer the gradients as they are (already averaged over the ranks
            # at the boundary): check them here, and refuse a step any rank saw a non-finite loss in.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if refuse or not math.isfinite(norm):
                engine.zero_grad()
                return False, norm, refuse, stats
            engine.step()
            return True, norm, refuse, stats
        engine.step()
        # ZeRO 1-3 refuse a step whose gradient norm is inf/NaN (fp32, fp16, and bf16 with check_grad_overflow)
        # and report it here; the norm is None only where DeepSpeed skips computing it.
        norm = engine.get_global_grad_norm()
        applied = bool(engine.was_step_applied())
        return applied, float(norm) if norm is not None else float("nan"), refuse, stats

    # ------------------------------------------------------------------------------------- across the ranks

    def _reduce(self, value: float, op: Any) -> float:
        if self._world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return float(t.item())

    def _any_rank(self, flag: bool) -> bool:
        return self._reduce(float(flag), torch.distributed.ReduceOp.MAX) > 0

    def _max_ranks(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.MAX)

    def _sum_ranks(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.SUM)

    def _advance_schedule(self, updates: int) -> None:
        for _ in range(updates):
            self._scheduler.step()

    def _finish(self, metrics: dict[str, float], weights: dict[str, float], start: float) -> dict[str, float]:
        metrics["train/version"] = float(self._version)
        metrics["timing/learner_s"] = time.perf_counter() - start
        if self._world == 1:
            return metrics
        gathered: list[Any] = [None] * self._world
        torch.distributed.all_gather_object(gathered, (metrics, weights))
        return reduce_rank_metrics(gathered)

    # ----------------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Free the engine and the reference model; destroy the process group if this learner created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close_channel()
        engine = getattr(self, "engine", None)
        for owned in (engine, self.reference):
            if owned is not None and hasattr(owned, "destroy"):  # DeepSpeed engines (the ZeRO-3 reference is one)
                owned.destroy()
        self.engine = None  # type: ignore[assignment]
        self.reference = None
        self._client_optimizer = None  # type: ignore[assignment]
        self._scheduler = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._release()

    def _release(self) -> None:
        if self._hf_ds_config is not None:
            self._hf_ds_config = None
            _restore_linear()
        created, self._created_group = self._created_group, None
        if created is not None:
            leave_process_group(created)
