"""GPU memory of each role, estimated from a model's shape alone (no GPU, no download, no Ray).

    shape = ModelShape.from_config_file("configs/models/gemma-2-9b-it/config.json")
    est = learner_memory(shape, LearnerSetup(ranks=4, zero_stage=3, micro_batch=2, seq_len=2048, logit_tokens=1025))
    est.total, est.terms                                  # bytes: the whole GPU, and what it is made of

Everything is plain arithmetic on the numbers in a Hugging Face ``config.json`` (layers, hidden size, heads, KV
heads, head size, MLP width, vocabulary). The terms, per learner GPU, in bf16 with a client AdamW:

- ``weights``: bf16 parameters, 2 bytes each; ZeRO-3 keeps 1/N of them per rank, plus the working set it gathers
  (the embedding, the layer being computed and the one prefetched).
- ``gradients``: bf16 gradients (2 bytes) and the fp32 copy the optimizer steps on (4 bytes); ZeRO-2 and -3
  partition both, ZeRO-1 only the fp32 copy, ZeRO-0 neither. Offloading the optimizer moves the fp32 copy to CPU.
- ``optimizer``: fp32 master weights (4 bytes) plus AdamW's m and v (4 + 4 bytes), or RMSprop's one running
  average (4 bytes); partitioned from ZeRO-1 on, on CPU with optimizer offload.
- ``buckets``: DeepSpeed's gradient-reduction bucket (``reduce_bucket_size`` 5e8 elements in bf16) from ZeRO-1 on.
- ``reference``: the frozen reference model in bf16; ZeRO-3 shards it like the policy, otherwise each rank holds it.
- ``activations``: what autograd keeps for the backward pass, per token per layer (see :func:`activation_bytes`);
  with gradient checkpointing only each layer's input is kept, plus one layer recomputed at a time. A model with
  attention soft-capping (Gemma-2) runs eager attention, whose score matrices count too (:func:`eager_score_bytes`).
- ``logits``: ``micro_batch x logit_tokens x vocab`` elements at 8 bytes (bf16 logits, the fp32 copy the chunked
  log-softmax keeps for backward, and the bf16 gradient), 4 more with Gemma-2's logit soft-capping.
- ``cuda_context``: the CUDA context and library handles of the process.

The sum is scaled by ``ALLOCATOR_OVERHEAD`` for the caching allocator's fragmentation. It is a sum of peaks that a
real step reaches at different moments, so it errs high; the calibration in docs/memory.md shows by how much.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9  # decimal gigabytes, as GPU memory is sold (an "80 GB" H100 holds a little more)

BF16 = 2
FP32 = 4
# DeepSpeed defaults (0.19): the gradient-reduction bucket and the ZeRO-3 prefetch bucket, in elements.
REDUCE_BUCKET_ELEMENTS = 5e8
PREFETCH_BUCKET_ELEMENTS = 5e7
CUDA_CONTEXT_BYTES = 0.5 * GB
ALLOCATOR_OVERHEAD = 1.05
# A vLLM engine's memory beyond weights and KV cache (activations of a forward, CUDA graphs, sampler buffers).
VLLM_RUNTIME_BYTES = 2.0 * GB


class ShapeError(ValueError):
    """A model config that lacks a number the estimate needs."""


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers that decide memory. ``norms_per_layer`` is 4 for Gemma-2 (pre and post norms)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    norms_per_layer: int = 2
    qkv_bias: bool = False
    logit_softcap: bool = False
    attention_softcap: bool = False
    """Gemma-2's attention logit cap: the learner then runs eager attention (eva_ray/attention.py), which keeps the
    sequence-squared score matrix."""
    has_lm_head: bool = True
    """False for a reward model whose head scores the last hidden state instead of predicting tokens."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "model") -> "ModelShape":
        """Read a Hugging Face ``config.json`` mapping (a nested ``text_config`` is used when present)."""
        cfg = cfg.get("text_config", cfg)

        def need(key: str) -> int:
            if cfg.get(key) is None:
                raise ShapeError(f"{name}: config.json has no {key!r}")
            return int(cfg[key])

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        model_type = str(cfg.get("model_type", ""))
        archs = " ".join(cfg.get("architectures") or [])
        return cls(
            name=name, layers=need("num_hidden_layers"), hidden=hidden, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate=need("intermediate_size"),
            vocab=need("vocab_size"), tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            logit_softcap=bool(cfg.get("final_logit_softcapping")),
            attention_softcap=bool(cfg.get("attn_logit_softcapping")),
            has_lm_head="CausalLM" in archs or not archs,
        )

    @classmethod
    def from_config_file(cls, path: str | Path, name: str | None = None) -> "ModelShape":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShapeError(f"cannot read model config {path}: {exc}") from None
        return cls.from_hf_config(data, name or path.parent.name)

    # ------------------------------------------------------------------------------------------ parameter counts

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate  # gate, up, down
        return attn + mlp + self.norms_per_layer * h

    @property
    def params(self) -> int:
        """All parameters: embedding, layers, final norm, and an untied LM head if the model has one."""
        head = self.embedding_params if self.has_lm_head and not self.tied_embeddings else 0
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    def kv_cache_bytes_per_token(self, dtype_bytes: int = BF16) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------------- activations


def activation_bytes_per_token_layer(shape: ModelShape) -> int:
    """Bytes autograd keeps per token in one decoder layer, bf16 compute, SDPA / flash attention (no s x s scores).

    Counted from what each op saves for its backward: each RMSNorm keeps its fp32 input (4h) and its bf16 output
    (2h); attention keeps q, k, v after rotary (2q + 4kv), its output (2q) and the contiguous copy o_proj reads
    (2q); the gated MLP keeps the gate (2i), its activation (2i), up (2i) and the
    product down_proj reads (2i).
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    norms = shape.norms_per_layer * (FP32 * h + BF16 * h)
    attention = BF16 * (q + 2 * kv) + BF16 * q + BF16 * q
    mlp = 4 * BF16 * i
    return norms + attention + mlp


def training_activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of ``tokens`` tokens (micro-batch x sequence length) kept for backward."""
    per_layer = activation_bytes_per_token_layer(shape) * tokens
    # Embedding output and the final norm, outside the layers.
    outside = (BF16 * shape.hidden + FP32 * shape.hidden + BF16 * shape.hidden) * tokens
    if checkpointing:
        # Each layer's input survives; one layer's activations exist at a time while it is recomputed.
        return shape.layers * BF16 * shape.hidden * tokens + per_layer + outside
    return shape.layers * per_layer + outside


EAGER_SCORE_BYTES = BF16 + FP32 + BF16
"""Per attention score, what eager attention keeps for backward: the capped scores (tanh's bf16 output), the fp32
softmax and the bf16 probabilities the value product reads."""


def eager_score_bytes(shape: ModelShape, micro_batch: int, seq_len: int, layers: int) -> int:
    """Score matrices of ``layers`` layers kept for backward under eager attention (0 for SDPA-served models)."""
    if not shape.attention_softcap:
        return 0
    return EAGER_SCORE_BYTES * shape.heads * seq_len * seq_len * micro_batch * layers


def logits_bytes(shape: ModelShape, logit_tokens: int) -> int:
    """Logits of the positions that predict trained tokens, with what their backward needs (see module doc)."""
    per_element = BF16 + FP32 + BF16 + (2 * BF16 if shape.logit_softcap else 0)
    return per_element * shape.vocab * logit_tokens


def inference_activation_bytes(shape: ModelShape, tokens: int) -> int:
    """Peak transient memory of a no-grad forward over ``tokens`` tokens: a layer's widest intermediates at once."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    return BF16 * (2 * h + q + 2 * kv + q + 3 * i) * tokens


# --------------------------------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """One GPU's memory: named terms in bytes; ``total`` includes the allocator overhead and the CUDA context."""

    terms: dict[str, float] = field(default_factory=dict)
    overhead: float = ALLOCATOR_OVERHEAD
    context: float = CUDA_CONTEXT_BYTES
    fixed_total: float | None = None
    """A share claimed up front (vLLM's gpu_memory_utilization): the total is that share, whatever the terms say."""

    @property
    def total(self) -> float:
        if self.fixed_total is not None:
            return self.fixed_total + self.context
        return sum(self.terms.values()) * self.overhead + self.context

    def largest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])


@dataclass(frozen=True)
class LearnerSetup:
    ranks: int = 1
    zero_stage: int = 2
    micro_batch: int = 8
    seq_len: int = 1024
    logit_tokens: int | None = None
    """Positions whose logits are computed per sequence (the learner keeps only the response's); default seq_len."""
    checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    reference: str = "sharded"
    """``sharded`` (with the policy under ZeRO-3, else a full copy per rank), ``none`` or ``actor`` (elsewhere)."""
    optimizer_states: int = 2
    """fp32 values the optimizer keeps per parameter besides the master copy: 2 for AdamW, 1 for RMSprop."""


def learner_memory(shape: ModelShape, s: LearnerSetup, reference_shape: ModelShape | None = None) -> Estimate:
    """Memory of one learner rank (see the module docstring for each term)."""
    if s.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage {s.zero_stage} is not 0-3")
    if s.offload_params and s.zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO-3")
    if s.offload_optimizer and s.zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO 1-3")
    p, n = shape.params, max(1, s.ranks)
    stage = s.zero_stage
    shard = {"weights": n if stage >= 3 else 1, "grad16": n if stage >= 2 else 1, "fp32": n if stage >= 1 else 1}
    terms: dict[str, float] = {}
    if stage == 3:
        gathered = BF16 * (shape.embedding_params + 2 * shape.layer_params + PREFETCH_BUCKET_ELEMENTS)
        terms["weights"] = (0 if s.offload_params else BF16 * p / n) + gathered
    else:
        terms["weights"] = BF16 * p
    terms["gradients"] = BF16 * p / shard["grad16"] + (0 if s.offload_optimizer else FP32 * p / shard["fp32"])
    terms["optimizer"] = 0 if s.offload_optimizer else (FP32 + s.optimizer_states * FP32) * p / shard["fp32"]
    if stage >= 1:
        terms["buckets"] = BF16 * min(REDUCE_BUCKET_ELEMENTS, p)
    ref = reference_shape or shape
    if s.reference == "sharded":
        terms["reference"] = BF16 * ref.params / (n if stage == 3 else 1)
    tokens = s.micro_batch * s.seq_len
    kept_layers = 1 if s.checkpointing else shape.layers  # of eager attention's score matrices
    terms["activations"] = (training_activation_bytes(shape, tokens, s.checkpointing)
                            + eager_score_bytes(shape, s.micro_batch, s.seq_len, kept_layers))
    terms["logits"] = logits_bytes(shape, s.micro_batch * (s.logit_tokens or s.seq_len))
    return Estimate(terms)


def reference_actor_memory(shape: ModelShape, micro_batch: int, seq_len: int, logit_tokens: int) -> Estimate:
    """A reference model on a GPU of its own: bf16 weights and one no-grad micro-batch."""
    return Estimate({
        "weights": BF16 * shape.params,
        "activations": inference_activation_bytes(shape, micro_batch * seq_len)
        + eager_score_bytes(shape, micro_batch, seq_len, 1),
        "logits": (BF16 + FP32) * shape.vocab * micro_batch * logit_tokens,
    })


OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1}
"""fp32 states per parameter of each ``learner.optimizer`` (RMSprop without momentum keeps its square average)."""

DTYPE_BYTES = {"float32": FP32, "bfloat16": BF16, "float16": BF16}


def reward_memory(shape: ModelShape, batch: int, max_length: int, dtype: str = "bfloat16") -> Estimate:
    """A reward model in ``dtype`` (``reward.dtype``) scoring ``batch`` sequences of ``max_length`` tokens, no grad.

    A score head reads the last hidden state, so there are no vocabulary logits unless the model has an LM head.
    float32 doubles every term.
    """
    scale = DTYPE_BYTES[dtype] / BF16
    terms = {"weights": BF16 * shape.params * scale,
             "activations": inference_activation_bytes(shape, batch * max_length) * scale}
    if shape.has_lm_head:
        terms["logits"] = BF16 * shape.vocab * batch * max_length * scale
    return Estimate(terms)


def vllm_memory(shape: ModelShape, tensor_parallel: int, gpu_memory_bytes: float, max_model_len: int, *,
                kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9) -> Estimate:
    """One GPU of a vLLM engine: its weight shard, its KV cache, and the engine's runtime.

    With ``kv_cache_bytes`` the engine takes weights + cache + runtime. Otherwise it claims
    ``gpu_memory_utilization`` of the GPU and gives the cache whatever the weights and runtime leave; a share too
    small for even one ``max_model_len`` sequence shows as a KV cache below ``kv_cache_min`` (a negative ``spare``).
    """
    weights = BF16 * shape.params / tensor_parallel
    per_gpu_token = shape.kv_cache_bytes_per_token() / tensor_parallel
    need_one_sequence = per_gpu_token * max_model_len
    if kv_cache_bytes is not None:
        return Estimate({"weights": weights, "kv_cache": float(kv_cache_bytes), "runtime": VLLM_RUNTIME_BYTES},
                        overhead=1.0)
    share = gpu_memory_utilization * gpu_memory_bytes
    kv = share - weights - VLLM_RUNTIME_BYTES
    est = Estimate({"weights": weights, "kv_cache": max(kv, 0.0), "runtime": VLLM_RUNTIME_BYTES}, overhead=1.0,
                   fixed_total=max(share, weights + VLLM_RUNTIME_BYTES + need_one_sequence))
    return est


def kv_cache_sequences(shape: ModelShape, tensor_parallel: int, kv_bytes: float, max_model_len: int) -> float:
    """How many full-length sequences a KV cache of ``kv_bytes`` per GPU holds."""
    per_seq = shape.kv_cache_bytes_per_token() / tensor_parallel * max_model_len
    return kv_bytes / per_seq if per_seq else math.inf


def hf_rollout_memory(shape: ModelShape, batch: int, seq_len: int) -> Estimate:
    """The transformers backend: weights, a dynamic KV cache for the whole batch, and one step's fp32 logits."""
    return Estimate({
        "weights": BF16 * shape.params,
        "kv_cache": shape.kv_cache_bytes_per_token() * batch * seq_len,
        "logits": FP32 * 2 * shape.vocab * batch,
        "activations": inference_activation_bytes(shape, batch),
    })
