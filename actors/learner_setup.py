"""The learner's set-up: DeepSpeed, the torch.distributed process group, the models and the optimizer.

Process-wide state, undone by :func:`leave_process_group` and :func:`_restore_linear` when the learner that set it
closes: the torch.distributed group (created with gloo or NCCL from MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
each set only if absent), torch's ``sys.excepthook`` wrapper, and ZeRO-3's replacement of
``torch.nn.functional.linear``. transformers' global HfDeepSpeedConfig lives only while a ZeRO-3 policy is being
built.

DeepSpeed on CPU (measured here, deepspeed 0.19.8): ZeRO 0, 2 and 3 train under gloo with a client
``torch.optim.AdamW``. The first ``TorchBackend`` would compile a shared-memory comm op (``build_shm_op`` in
``deepspeed.comm.torch``, about 60 s, g++ and ninja); :func:`_import_deepspeed` replaces that function with one
returning None before DeepSpeed builds its backend, and the learner never uses DeepSpeed's own (compiled) optimizers
unless the optimizer state is offloaded.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from eva_ray.attention import attention_implementation
from eva_ray.config import LearnerConfig
from eva_ray.lr_schedule import OPTIMIZERS

# Environment a single-process torch.distributed group needs; set only when absent (a launcher sets its own).
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


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


@dataclass
class CreatedGroup:
    """What a learner that created the default process group must undo when it closes."""

    env: list[str] = field(default_factory=list)
    """The environment variables it set."""
    excepthook: Any = None
    """``sys.excepthook`` before ``init_process_group`` wrapped it."""


def join_process_group(deepspeed: Any, device: torch.device) -> CreatedGroup | None:
    """Join the default process group, creating it when absent; what to undo on close, or None (not ours).

    torch.distributed has one default group per process. A group someone else created (a launcher, torchrun, a
    test) is used and never destroyed; one created here belongs to this learner, which destroys it on close so that
    a later learner in the same process starts clean.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)  # wraps the existing group in DeepSpeed's backend
        return None
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}
    added = [key for key in _DIST_ENV if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # init_process_group wraps sys.excepthook (to prefix "[rank0]: ") and destroy_process_group never unwraps it:
    # keep the original so that creating learners again and again does not nest the prefix.
    created = CreatedGroup(env=added, excepthook=sys.excepthook)
    deepspeed.init_distributed(dist_backend=backend)
    return created


def leave_process_group(created: CreatedGroup) -> None:
    """Destroy the group :func:`join_process_group` created, and undo what it set."""
    import deepspeed.comm as ds_comm

    if torch.distributed.is_initialized():
        ds_comm.destroy_process_group()
    for key in created.env:
        os.environ.pop(key, None)
    if created.excepthook is not None:
        sys.excepthook = created.excepthook


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
    """``learner.optimizer``: AdamW (torch's, or DeepSpeed's CPU Adam when the optimizer state is offloaded), or
    torch's RMSprop.

    With ``offload_optimizer`` the update runs on the CPU, where torch's AdamW would cost seconds per billion
    parameters; DeepSpeed's SIMD CPU Adam is the one ZeRO-Offload is built for. It compiles a C++ extension the
    first time (about a minute, needs g++ and ninja), which is why nothing else uses it. It has no RMSprop, so the
    config refuses rmsprop with offloading.

    RMSprop keeps torch's defaults (alpha 0.99, eps 1e-8, no momentum), which is what Hugging Face's
    ``optim="rmsprop"`` builds and so what SPPO's published runs used.
    """
    if cfg.optimizer == "rmsprop":
        if cfg.offload_optimizer:
            raise ValueError("learner.offload_optimizer: needs learner.optimizer adamw, not rmsprop")
        return torch.optim.RMSprop(groups, lr=cfg.lr)
    if cfg.optimizer != "adamw":
        raise ValueError(f"learner.optimizer: {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
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


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


# ------------------------------------------------------------------------------------------ DeepSpeed configs


def _zero_config(cfg: LearnerConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The policy's DeepSpeed config for an engine that only runs forward passes (no optimizer, no clipping)."""
    return {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}


def _ds_config(cfg: LearnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        # The learner owns accumulation: the number of micro-batches varies with the batch, each loss arrives
        # already weighted by its share of the batch, and the boundary is set by hand on the last one.
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": _zero_config(cfg),
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
