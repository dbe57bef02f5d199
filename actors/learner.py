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
   ``solver.skip_zero_advantage`` is set, or always for OAIF (no pair, nothing to learn). Adam keeps moving the
   weights on a zero or KL-only gradient through its momentum; on a tiny model that collapsed the policy
   (notes/proving-ground-feasibility.md).
2. OAIF keeps only the best and worst response of each prompt (``select_pairs``): the policy and the reference
   model then run on 2 responses per prompt instead of N.
3. Reference log-probs, once (no grad). With RLOO and ``beta == 0`` there is no reference model at all.
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

Process-wide state, restored when the last learner closes: the torch.distributed group (created with gloo or NCCL
from MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, each set only if absent), torch's ``sys.excepthook`` wrapper,
and ZeRO-3's replacement of ``torch.nn.functional.linear``. transformers' global HfDeepSpeedConfig lives only while
a ZeRO-3 policy is being built.

DeepSpeed on CPU (measured here, deepspeed 0.19.8): ZeRO 0, 2 and 3 train under gloo with a client
``torch.optim.AdamW``. The first ``TorchBackend`` would compile a shared-memory comm op (``build_shm_op`` in
``deepspeed.comm.torch``, about 60 s, g++ and ninja); the learner replaces that function with one returning None
before DeepSpeed builds its backend, and never uses DeepSpeed's own (compiled) optimizers.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from actors.weight_channel import ChannelSpec, WeightChannel, collective, host_store, send
from eva_ray.attention import attention_implementation
from eva_ray.batching import TrainBatch, groups_with_spread, micro_batches, right_pad, select_pairs, share_units
from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig
from eva_ray.losses import entropy_from_logits, get_policy_loss, kl_estimate, masked_mean, token_logprobs
from eva_ray.losses.off_policy import Correction, importance_weights
from eva_ray.metrics import reduce_rank_metrics, weighted_means
from eva_ray.weights import fingerprint, spec_of

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")

# Environment a single-process torch.distributed group needs; set only when absent (a launcher sets its own).
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


# ------------------------------------------------------------------------------------------------ LR schedule


def lr_multiplier(schedule: str, total_updates: int, warmup_ratio: float) -> Callable[[int], float]:
    """The factor on the peak learning rate used by optimizer update ``k`` (0-based), for ``torch``'s ``LambdaLR``.

    Warm-up: ``warmup = ceil(warmup_ratio * total_updates)`` updates with factor ``(k + 1) / warmup``, so the first
    update already moves the weights (HF's ``k / warmup`` spends update 0 at lr 0) and update ``warmup - 1`` runs
    at the peak. Then, with ``d = (k - warmup) / (total_updates - warmup)``: ``constant`` 1, ``linear`` ``1 - d``,
    ``cosine`` ``(1 + cos(pi d)) / 2``. Past ``total_updates`` the factor stays at its final value, never negative.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; allowed: {list(LR_SCHEDULES)}")
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    warmup = math.ceil(warmup_ratio * total_updates)
    decay = max(1, total_updates - warmup)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        d = min(1.0, (k - warmup) / decay)
        if schedule == "linear":
            return 1.0 - d
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * d))
        return 1.0

    return factor


# ------------------------------------------------------------------------------------------ DeepSpeed set-up


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the shared-memory comm op disabled.

    ``deepspeed.comm.torch.TorchBackend.__init__`` calls the module-level ``build_shm_op()``, which JIT-compiles a
    C++ extension on CPU (about 60 s, needs g++/ninja) for an intra-node all-reduce a single learner never needs.
    Replacing the module attribute (it is looked up at call time) before any backend exists skips the build; gloo
    does the collectives.
    """
    if device.type == "cpu" and "deepspeed" not in sys.modules and torch.cuda.is_available():
        # DeepSpeed picks its accelerator once, at first import; a CPU learner on a GPU machine must say so first.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    import deepspeed

    # DeepSpeed logs every engine detail at INFO; a driver printing one line per step drowns in it.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


# torch.distributed has one default group per process. Learners that find none create it and share it; the last
# of them to close destroys it (and removes the environment it set), so a later learner in the same process (tests
# build several) starts clean. A group someone else created (a launcher, torchrun) is used and never destroyed.
_GROUP: dict[str, Any] = {"users": 0, "env": [], "zero3": 0, "excepthook": None}


def _acquire_process_group(deepspeed: Any, device: torch.device) -> bool:
    """Join or create the default process group; True when this learner counts as a user of a group we created."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)  # wraps the existing group in DeepSpeed's backend
        if _GROUP["users"]:
            _GROUP["users"] += 1
            return True
        return False
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}
    added = [key for key in _DIST_ENV if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # init_process_group wraps sys.excepthook (to prefix "[rank0]: ") and destroy_process_group never unwraps it:
    # keep the original so that creating learners again and again does not nest the prefix.
    _GROUP["excepthook"] = sys.excepthook
    deepspeed.init_distributed(dist_backend=backend)
    _GROUP.update(users=1, env=added)
    return True


def _release_process_group() -> None:
    _GROUP["users"] -= 1
    if _GROUP["users"] > 0:
        return
    import deepspeed.comm as ds_comm

    if torch.distributed.is_initialized():
        ds_comm.destroy_process_group()
    for key in _GROUP["env"]:
        os.environ.pop(key, None)
    if _GROUP["excepthook"] is not None:
        sys.excepthook = _GROUP["excepthook"]
    _GROUP.update(users=0, env=[], excepthook=None)


def _restore_linear() -> None:
    """Undo ZeRO-3's process-wide ``torch.nn.functional.linear`` replacement.

    ``zero.Init`` swaps in its own linear (so partitioned weights can be gathered) and leaves it there "unless
    manually reset". Once no ZeRO-3 learner is alive, the rest of the process (an inline rollout worker, later
    tests) gets the stock function back.
    """
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as patcher

    original = getattr(patcher, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is zero3_linear_wrap:
        torch.nn.functional.linear = original


def _zero_dropout(config: Any) -> None:
    """Set every dropout probability in an HF config to 0.

    RL losses compare log-probs of the same tokens across passes (old vs new, reference vs policy); dropout would
    make the ratio of identical weights differ from 1 and the no-grad NaN check differ from the update it guards.
    """
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)


def _load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    _zero_dropout(config)
    config.use_cache = False  # training never decodes; a KV cache would only cost memory
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attention_implementation(config))
    for module in model.modules():  # dropout hard-coded in a module rather than read from the config
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _make_optimizer(groups: list[dict[str, Any]], cfg: LearnerConfig) -> torch.optim.Optimizer:
    """AdamW: torch's, or DeepSpeed's CPU Adam when the optimizer state is offloaded.

    With ``offload_optimizer`` the update runs on the CPU, where torch's AdamW would cost seconds per billion
    parameters; DeepSpeed's SIMD CPU Adam is the one ZeRO-Offload is built for. It compiles a C++ extension the
    first time (about a minute, needs g++ and ninja), which is why nothing else uses it.
    """
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm gains (1-D tensors), as usual for transformers."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter has an empty .shape; its real shape is ds_shape.
        shape = getattr(param, "ds_shape", param.shape)
        (no_decay if len(shape) <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed drops empty groups from the optimizer after the LR scheduler has counted them: drop them first.
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------------ learner


class Learner:
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
        if solver.algorithm == "oaif" and not solver.beta > 0:
            raise ValueError(f"solver.beta: {solver.beta} with solver.algorithm 'oaif'; DPO needs beta > 0")
        if model.dtype not in DTYPES:
            raise ValueError(f"model.dtype: {model.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.solver, self.cfg, self.model_cfg = solver, learner, model
        self.model_path = model_path
        self.temperature = float(temperature)
        self.total_updates = total_steps * solver.updates_per_batch
        self._loss_fn = get_policy_loss(solver.algorithm)
        # RLOO uses the importance ratio pi / pi_old only when one batch gets several updates. With one update the
        # ratio is exactly 1 and its gradient equals REINFORCE's, but its value would make train/loss read
        # -mean(A) = 0 every step; the plain -mean(A * log pi) keeps a loss that falls as the policy learns.
        self._use_ratio = solver.algorithm == "rloo" and solver.updates_per_batch > 1
        # "auto" is resolved by the driver (TIS when rollout overlaps training); a learner built directly has no lag
        # to correct unless asked.
        method = learner.off_policy_correction if learner.off_policy_correction != "auto" else "none"
        self._correction = Correction(method if solver.algorithm == "rloo" else "none", cap=learner.is_cap,
                                      low=learner.icepop_low, high=learner.icepop_high)
        self._version = 0
        self._closed = False
        self._owns_group = False
        self._channel: WeightChannel | None = None
        self._channel_store: Any = None
        self._channel_spec: ChannelSpec | None = None
        requested = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(seed)

        deepspeed = _import_deepspeed(requested)
        self._deepspeed = deepspeed
        self._owns_group = _acquire_process_group(deepspeed, requested)
        self._rank = torch.distributed.get_rank()
        self._world = torch.distributed.get_world_size()
        dtype = DTYPES[model.dtype]
        ds_config = self._ds_config(dtype)

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
                _GROUP["zero3"] += 1
                # The reference is partitioned over the ranks like the policy (an inference-only engine), never a
                # full copy per rank.
                reference = self._load_reference(model.reference or model_path, dtype)
                if reference is not None:
                    self.reference = deepspeed.initialize(model=reference,
                                                          config=self._reference_ds_config(ds_config))[0]
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
        """The frozen reference model, or None when the loss never reads it (RLOO with ``beta == 0``).

        Under ZeRO 0-2 a plain replicated module in eval mode without gradients, loaded *before* any
        HfDeepSpeedConfig exists (while one is alive, every from_pretrained in the process builds a
        ZeRO-3-partitioned model, which only a DeepSpeed engine can run). Under ZeRO-3 it is loaded while one is
        alive and wrapped in an inference engine, so it is partitioned over the ranks.
        """
        if self.solver.algorithm == "rloo" and self.solver.beta == 0:
            return None
        reference = _load_causal_lm(path, dtype, self.model_cfg.trust_remote_code)
        return reference.requires_grad_(False).eval()

    def _zero_config(self) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": self.cfg.zero_stage}
        if self.cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return zero

    @staticmethod
    def _reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
        """The policy's DeepSpeed config for an engine that only runs forward passes (no optimizer, no clipping)."""
        return {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}

    def _ds_config(self, dtype: torch.dtype) -> dict[str, Any]:
        return {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            # The learner owns accumulation: the number of micro-batches varies with the batch, each loss arrives
            # already weighted by its share of the batch, and the boundary is set by hand on the last one.
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": self._zero_config(),
            "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
            "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

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
        s = self.solver
        mask = batch.response_token_mask
        if s.algorithm == "oaif":
            return self._loss_fn(logprobs, ref, mask, batch.rewards, beta=s.beta, loss_type=s.dpo_loss)
        weights, is_stats = is_weights
        loss, stats = self._loss_fn(logprobs, ref, mask, batch.rewards, beta=s.beta, kl_estimator=s.kl_estimator,
                                    kl_mode=s.kl_mode, aggregation=s.aggregation, old_logprobs=old,
                                    clip_eps=s.clip_eps, is_weights=weights)
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
        if not self._any_rank(bool(spread.any())) and (s.skip_zero_advantage or s.algorithm == "oaif"):
            # Nothing in the rewards to learn from. The schedule still advances, so the LR stays keyed to the
            # driver's step count rather than to the number of batches that happened to carry a signal.
            self._advance_schedule(s.updates_per_batch)
            return self._finish(metrics, weights, start)

        full = (select_pairs(batch) if s.algorithm == "oaif" else batch).to(self.device)
        unit = "group" if s.algorithm == "oaif" else s.aggregation
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

    # ---------------------------------------------------------------------------------------------- weights

    @contextmanager
    def _gathered(self, param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        """The full tensor of ``param`` (ZeRO-3: gathered from every rank for the duration of the block)."""
        if hasattr(param, "ds_id"):
            with self._deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield param.data
        else:
            yield param.data

    def _weight_entries(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """``(names, tensor)`` per parameter (``state_dict`` order), then per persistent buffer; nothing gathered."""
        module = self.engine.module
        keys = list(module.state_dict(keep_vars=True).keys())
        key_set = set(keys)
        by_param: dict[int, list[str]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if name in key_set:
                by_param.setdefault(id(param), []).append(name)
                params[id(param)] = param
        order = {name: i for i, name in enumerate(keys)}
        for pid in sorted(by_param, key=lambda p: order[by_param[p][0]]):
            yield by_param[pid], params[pid]
        param_names = {n for names in by_param.values() for n in names}
        for name, buf in module.named_buffers():
            if name in key_set and name not in param_names:
                yield [name], buf

    def iter_weights(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield ``(names, tensor)`` per parameter (in ``state_dict`` order), then per persistent buffer.

        ``names`` lists every ``state_dict`` key of the tensor (tied weights, e.g. an LM head sharing the embedding,
        appear once with both names). Under ZeRO-3 the tensor is gathered only while the consumer holds it: use it
        (copy, broadcast) before advancing. A collective under ZeRO-3: every rank must iterate.
        """
        for names, tensor in self._weight_entries():
            if isinstance(tensor, torch.nn.Parameter):
                with self._gathered(tensor) as full:
                    yield names, full
            else:
                yield names, tensor

    def weights_fingerprint(self) -> list[float]:
        """:func:`eva_ray.weights.fingerprint` of what :meth:`iter_weights` yields (a collective under ZeRO-3)."""
        return fingerprint(tensor for _, tensor in self.iter_weights())

    def weight_manifest(self) -> list[list]:
        """Names, full shapes and dtypes of what :meth:`iter_weights` yields, in order, without gathering anything."""
        return [spec_of(names, t, getattr(t, "ds_shape", None)).as_list() for names, t in self._weight_entries()]

    # ------------------------------------------------------------------------------------------ weight channel

    def open_weight_channel(self, host: str, world_size: int, *, bucket_bytes: int, timeout_s: float,
                            backend: str = "auto") -> dict[str, Any]:
        """Host the channel's rendezvous on ``host`` and return its spec for the receivers (see ``join``).

        ``backend`` ``auto``: NCCL when the learner computes on a GPU, else gloo.
        """
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._close_channel()
        self._channel_store, port = host_store(host, world_size, timeout_s)
        spec = ChannelSpec(host=host, port=port, world_size=world_size, backend=backend, bucket_bytes=bucket_bytes,
                           timeout_s=timeout_s, manifest=tuple(tuple(x) for x in self.weight_manifest()))
        self._channel_spec = spec
        return spec.as_dict()

    @collective
    def join_weight_channel(self) -> None:
        """Rank 0 joins the channel opened by :meth:`open_weight_channel`; returns once every receiver joined."""
        if self._channel_spec is None:
            raise RuntimeError("join_weight_channel before open_weight_channel")
        self._channel = WeightChannel(self._channel_spec, 0, store=self._channel_store)

    @collective
    def push_weights(self) -> dict[str, float]:
        """Broadcast the current policy, bucket by bucket, to every receiver; returns the sync's stats."""
        if self._rank != 0:
            # ZeRO-3 gathers each parameter from every rank: the other ranks take part, rank 0 sends.
            for _ in self.iter_weights():
                pass
            return {"version": self._version, "buckets": 0, "bytes": 0, "seconds": 0.0}
        if self._channel is None:
            raise RuntimeError("push_weights without a weight channel (open_weight_channel, join_weight_channel)")
        return send(self._channel, self._version, self.iter_weights()).as_dict()

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._channel_store = None
        self._channel_spec = None

    def get_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, state_dict)``: the current policy's full weights on the CPU, keyed like HF's ``state_dict``.

        Tied aliases share one CPU tensor. The tensors have the dtype the policy computes in (bf16 under bf16).
        Loads into a fresh model of the same architecture with ``load_state_dict(strict=True)``. Under ZeRO-3 every
        rank must call it; ranks other than 0 return an empty dict.
        """
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        state: dict[str, torch.Tensor] = {}
        for names, tensor in self.iter_weights():
            if rank0:
                # copy=True: on the CPU .to("cpu") would return the engine's own storage, which the next step
                # overwrites in place.
                cpu = tensor.detach().to("cpu", copy=True)
                for name in names:
                    state[name] = cpu
        return self._version, state

    def distance_from_reference(self) -> float:
        """L2 norm of ``policy - reference`` over all parameters (0.0 until the first update).

        The reference is the frozen reference model (``model.reference``, else the starting weights). With RLOO at
        ``beta == 0`` no reference is kept, so the starting weights are read from ``model_path`` for this call.
        Under ZeRO-3 a collective, like :meth:`get_weights`.
        """
        reference = self.reference
        if reference is None:
            reference = _load_causal_lm(self.model_path, DTYPES[self.model_cfg.dtype], self.model_cfg.trust_remote_code)
        module = getattr(reference, "module", reference)  # the ZeRO-3 reference is an engine
        ref_params = dict(module.named_parameters(remove_duplicate=False))
        total = 0.0
        for names, tensor in self.iter_weights():
            ref = ref_params.get(names[0])
            if ref is not None:
                with self._gathered(ref) as full:
                    total += (tensor.float() - full.detach().to(tensor.device).float()).square().sum().item()
        return math.sqrt(total)

    def save(self, path: str) -> None:
        """Write the current policy (HF ``save_pretrained``) and its tokenizer to ``path`` (rank 0 writes)."""
        from transformers import AutoTokenizer

        _, state = self.get_weights()
        if not state:
            return
        self.engine.module.save_pretrained(path, state_dict=state)
        tokenizer_path = self.model_cfg.tokenizer or self.model_path
        AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.model_cfg.trust_remote_code
                                      ).save_pretrained(path)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> dict[str, Any]:
        """Write a resumable checkpoint to the folder ``path``: weights, optimizer, LR schedule (DeepSpeed's own
        ``save_checkpoint``), and the version and RNG state (``learner.json``, written by rank 0 only).

        A collective: every rank calls it with the same ``path`` (a folder all ranks can reach). Returns the version
        saved and the bytes rank 0 sees under ``path``.
        """
        if self._closed:
            raise RuntimeError("save_checkpoint on a closed learner")
        import json
        from pathlib import Path

        folder = Path(path)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if rank0:
            folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(folder), tag=_CHECKPOINT_TAG, save_latest=False)
        if rank0:
            state = {"version": self._version, "torch_rng": _b64(torch.get_rng_state()),
                     "cuda_rng": _b64(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None}
            tmp = folder / (_LEARNER_STATE + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, folder / _LEARNER_STATE)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank reports the checkpoint written before rank 0's state is there
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if rank0 else 0
        return {"version": self._version, "bytes": size}

    def load_checkpoint(self, path: str) -> int:
        """Continue from a checkpoint :meth:`save_checkpoint` wrote (into a learner built with the same config).

        A collective, like saving. Restores weights, optimizer and LR schedule and the version; returns the version.
        """
        if self._closed:
            raise RuntimeError("load_checkpoint on a closed learner")
        import json
        from pathlib import Path

        folder = Path(path)
        state_file = folder / _LEARNER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{folder} is not a learner checkpoint (no {_LEARNER_STATE})")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=_CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder} (tag {_CHECKPOINT_TAG})")
        state = json.loads(state_file.read_text())
        self._version = int(state["version"])
        torch.set_rng_state(_unb64(state["torch_rng"]))
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(_unb64(state["cuda_rng"]))
        return self._version

    # ----------------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Free the engine and the reference model; destroy the process group if learners created it. Idempotent."""
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
            _GROUP["zero3"] -= 1
            if _GROUP["zero3"] == 0:
                _restore_linear()
        if self._owns_group:
            self._owns_group = False
            _release_process_group()


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


_CHECKPOINT_TAG = "deepspeed"
_LEARNER_STATE = "learner.json"


def _b64(tensor: torch.Tensor) -> str:
    import base64

    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    import base64

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
