"""Rollout worker: samples the solver's responses to a batch of prompts, with transformers or vLLM.

One :class:`RolloutWorker` owns one copy of the policy's weights and its generation engine. The driver's rollout
group shards a batch across several of them (``eva_ray.rollouts.shard``) and pushes new weights into each after a
learner step. It is a plain class: Ray wraps it at launch, tests and single-GPU runs call it inline.

    worker = RolloutWorker("runs/tiny/policy", max_new_tokens=64, seed=0)
    groups = worker.generate(prompts, n=4)      # groups[i][j]: the j-th response to prompts[i], a Rollout
    worker.update_weights(learner_state_dict, version=1)

Backends:

- ``hf``: ``transformers`` ``generate`` (CPU or GPU). ``static_cache=True`` compiles a static KV cache: much faster
  decoding on a GPU after a long warm-up, pointless on CPU.
- ``vllm``: a ``vllm.LLM`` engine (CUDA only; the ``gpu`` extra). Weights are updated in place through a small
  worker extension (:class:`VLLMWeightLoader`) called over ``collective_rpc``. Written against the vLLM API noted in
  ``notes/gpu-path-api.md``; it cannot run in CI.

Both backends format prompts the same way (the tokenizer's chat template with a generation prompt, then
left-truncation to ``max_prompt_tokens``, counted) and return the same :class:`~eva_ray.rollouts.Rollout` records.
A response that ends with the end-of-sequence token keeps that token in ``response_token_ids`` (so the learner
trains the stop decision) and has ``finish_reason="stop"``; one cut by ``max_new_tokens`` has ``"length"``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout

BACKENDS: tuple[str, ...] = ("hf", "vllm")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VLLM_MISSING = "backend 'vllm' needs the gpu extra: pip install -e '.[gpu]'; use backend 'hf' on CPU"
_SHOW = 5  # how many offending names an error message lists


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled. ``temperature=0`` means greedy decoding (vLLM's convention)."""

    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass
class _Sample:
    token_ids: list[int]
    finish_reason: str


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


def cut_at_eos(token_ids: Sequence[int], eos_ids: frozenset[int]) -> _Sample:
    """Keep the tokens up to and including the first end-of-sequence token.

    What follows the first EOS in a batched ``generate`` output is padding. Without an EOS the response ran into the
    token limit and is returned whole.
    """
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return _Sample(list(token_ids[: i + 1]), "stop")
    return _Sample(list(token_ids), "length")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")


class WeightNames:
    """The parameter names (and shapes) a state dict must carry to replace a model's weights.

    Tied weights (an LM head sharing the embedding matrix) appear under several names; sending any one of them is
    enough. Persistent buffers may be sent but need not be.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        groups: dict[int, list[str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
            self.shapes[name] = tuple(param.shape)
        self.alias_groups: list[list[str]] = list(groups.values())
        self.known: set[str] = set(self.shapes) | set(model.state_dict().keys())

    def check(self, state_dict: Mapping[str, Any]) -> None:
        """Raise a ValueError naming a few offenders if ``state_dict`` does not match the model exactly."""
        bad_types = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
        if bad_types:
            raise TypeError(f"update_weights: values must be torch.Tensor; not for {_names(bad_types)}")
        unknown = sorted(set(state_dict) - self.known)
        missing = sorted(group[0] for group in self.alias_groups if not any(n in state_dict for n in group))
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown name(s): {_names(unknown)}")
        if missing:
            problems.append(f"{len(missing)} missing parameter(s): {_names(missing)}")
        if problems:
            example = _names(sorted(self.shapes))
            raise ValueError(f"update_weights: the state dict does not match the policy ({'; '.join(problems)}). "
                             f"The policy's names look like: {example}")
        wrong = [f"{n} {tuple(t.shape)} != {self.shapes[n]}" for n, t in state_dict.items()
                 if n in self.shapes and tuple(t.shape) != self.shapes[n]]
        if wrong:
            raise ValueError(f"update_weights: {len(wrong)} shape mismatch(es): {_names(wrong)}")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows so every prompt ends at the same column, where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for one call without disturbing the caller's global random state."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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


# ---------------------------------------------------------------------------------------------------------- backends


class _HFBackend:
    """``transformers`` generate."""

    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, static_cache: bool,
                 eos_ids: frozenset[int], pad_id: int) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = device
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.static_cache = static_cache
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        # A checkpoint's generation_config.json may carry top_k, repetition_penalty and the like. They would silently
        # move the sampling distribution away from the plain temperature/top-p one the learner's log-probs assume.
        self.model.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
        self.names = WeightNames(self.model)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[list[_Sample]]:
        input_ids, attention_mask = _left_pad(prompt_ids, self.pad_id, self.device)
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=sorted(self.eos_ids), do_sample=not greedy)
        if not greedy:
            # top_k=0: transformers' global default is top_k=50; our sampling is temperature + top-p only.
            kwargs.update(num_return_sequences=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        with _seeded(seed, self.device), torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        # Sampling repeats each prompt n times in place (rows [i*n, (i+1)*n) answer prompt i); greedy decoding gives
        # one row per prompt, and its n responses are identical by definition.
        def row(i: int, j: int) -> list[int]:
            return new_tokens[i] if greedy else new_tokens[i * n + j]

        return [[cut_at_eos(row(i, j), self.eos_ids) for j in range(n)] for i in range(len(prompt_ids))]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.names.check(state_dict)
        # load_state_dict copies into the existing tensors, casting dtype and moving device as needed.
        self.model.load_state_dict(dict(state_dict), strict=False)

    def sleep(self, level: int) -> None:  # nothing to release: an HF model has no separate KV-cache pool
        pass

    def wake_up(self, tags: list[str] | None) -> None:
        pass


class VLLMWeightLoader:
    """vLLM worker extension: loads HF-named tensors into the running model.

    vLLM mixes this class into its GPU worker (``worker_extension_cls`` takes the qualified name), so ``self`` is
    the worker and ``self.model_runner.model`` the vLLM model, whose ``load_weights`` maps HF names onto its fused
    layers (q/k/v into qkv_proj, ...). It must not import vllm at module level: this file also serves CPU runs.
    """

    def load_hf_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        model.load_weights(weights=[(name, tensor.to(device, non_blocking=True)) for name, tensor in weights])
        return len(weights)


_VLLM_EXTENSION = f"{VLLMWeightLoader.__module__}.{VLLMWeightLoader.__qualname__}"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc
    return vllm


class _VLLMBackend:
    """A ``vllm.LLM`` engine (CUDA only)."""

    def __init__(self, model_path: str, *, tokenizer_path: str, dtype: str, seed: int, gpu_memory_utilization: float,
                 max_model_len: int, enable_sleep_mode: bool, eos_ids: frozenset[int]) -> None:
        vllm = _import_vllm()
        from transformers import AutoConfig, AutoModelForCausalLM

        # With the default multiprocess engine core, collective_rpc arguments (our weight tensors) cross a process
        # boundary; vLLM only pickles tensors when this is set. Both ends are our own processes on this machine.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.eos_ids = eos_ids
        self.llm = vllm.LLM(
            model_path, tokenizer=tokenizer_path, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode, worker_extension_cls=_VLLM_EXTENSION,
            generation_config="vllm",  # ignore the checkpoint's sampling defaults, as the HF backend does
        )
        # The HF names the learner sends are checked against a weightless (meta-device) copy of the architecture.
        with torch.device("meta"):
            self.names = WeightNames(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path)))
        self.max_positions = None  # vLLM checks max_model_len against the model itself

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[list[_Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM seeds the k-th of a request's n samples with seed + k, so requests are spaced n apart to keep every
        # sample of the call on its own stream. max_tokens must be explicit: vLLM's default is 16.
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=seed + i * n,
                                 stop_token_ids=sorted(self.eos_ids), detokenize=False)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [[self._sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def _sample(self, completion: Any) -> _Sample:
        ids = list(completion.token_ids)
        if completion.finish_reason != "stop":
            # "length", or "abort" (the engine dropped the request): either way no stop decision was made.
            return _Sample(ids, "length")
        if (not ids or ids[-1] not in self.eos_ids) and isinstance(completion.stop_reason, int):
            ids.append(completion.stop_reason)  # keep the stop token, as the HF backend does
        return _Sample(ids, "stop")

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.names.check(state_dict)
        self.llm.collective_rpc("load_hf_weights", args=([(n, t.detach()) for n, t in state_dict.items()],))
        # Cached prefixes hold keys/values computed with the old weights; reusing them would mix two policies.
        self.llm.reset_prefix_cache()

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None) -> None:
        self.llm.wake_up(tags=tags)


# ------------------------------------------------------------------------------------------------------------ worker


class RolloutWorker:
    """Samples ``n`` responses per prompt from the current policy and stamps them with its version."""

    def __init__(self, model_path: str, *, backend: str = "hf", tokenizer_path: str | None = None,
                 dtype: str = "float32", temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 max_prompt_tokens: int = 1024, seed: int = 0, device: str | None = None,
                 static_cache: bool = False, gpu_memory_utilization: float = 0.5, worker_index: int = 0,
                 enable_sleep_mode: bool = False) -> None:
        _check_settings(backend, dtype, temperature, top_p, max_new_tokens, max_prompt_tokens, gpu_memory_utilization)
        self.sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.worker_index = worker_index
        self.backend_name = backend
        self.tokenizer = _load_tokenizer(tokenizer_path or model_path)
        self.eos_ids = frozenset(_checkpoint_eos_ids(model_path) | {self.tokenizer.eos_token_id})
        # A tokenizer without a pad token (Llama-3 style) pads with EOS: padding is masked out and cut off anyway.
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        if backend == "hf":
            self._engine: _HFBackend | _VLLMBackend = _HFBackend(
                model_path, dtype=DTYPES[dtype], device=resolve_device(device), static_cache=static_cache,
                eos_ids=self.eos_ids, pad_id=pad_id)
        else:
            self._engine = _VLLMBackend(
                model_path, tokenizer_path=tokenizer_path or model_path, dtype=dtype, seed=seed + worker_index,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_prompt_tokens + max_new_tokens,
                enable_sleep_mode=enable_sleep_mode, eos_ids=self.eos_ids)
        _warn_if_too_long(self._engine.max_positions, max_prompt_tokens + max_new_tokens)
        self._version = 0
        self._calls = 0
        self._totals = {"prompts": 0, "responses": 0, "tokens_generated": 0, "truncated_prompts": 0,
                        "finished_stop": 0, "finished_length": 0}
        self._last = {"tokens_per_s": 0.0, "last_call_s": 0.0}

    @property
    def policy_version(self) -> int:
        """Version of the weights now loaded (0 until the first ``update_weights``)."""
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

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights with the learner's and adopt its ``version``.

        Every parameter must be present (tied aliases count once) and no unknown name may appear: a silent partial
        load would make the samples come from a policy nobody trained. Versions may repeat but never go back.
        """
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {version!r}")
        if version < self._version:
            raise ValueError(f"policy version must not go backwards: have {self._version}, got {version}")
        self._engine.load_weights(state_dict)
        self._version = version

    def stats(self) -> dict[str, float]:
        """Running totals (prompts, responses, tokens generated, truncated prompts, finish reasons) and the speed of
        the last call (``tokens_per_s``, ``last_call_s``)."""
        return {**self._totals, **self._last, "calls": self._calls, "policy_version": self._version}

    def sleep(self, level: int = 1) -> None:
        """vLLM: release GPU memory between rollouts (needs ``enable_sleep_mode``). HF: nothing to do."""
        self._engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM: take back the memory released by ``sleep`` (``tags``: weights, kv_cache). HF: nothing to do."""
        self._engine.wake_up(tags)

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

    def _rollout(self, prompt: PromptRecord, prompt_ids: list[int], sample: _Sample) -> Rollout:
        return Rollout(prompt_id=prompt.id, prompt_token_ids=list(prompt_ids), response_token_ids=sample.token_ids,
                       text=self.tokenizer.decode(sample.token_ids, skip_special_tokens=True),
                       finish_reason=sample.finish_reason, policy_version=self._version)

    def _count(self, groups: list[list[Rollout]], elapsed: float) -> None:
        rollouts = [r for group in groups for r in group]
        tokens = sum(len(r.response_token_ids) for r in rollouts)
        self._totals["prompts"] += len(groups)
        self._totals["responses"] += len(rollouts)
        self._totals["tokens_generated"] += tokens
        for r in rollouts:
            self._totals[f"finished_{r.finish_reason}"] += 1
        self._last = {"tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "last_call_s": elapsed}


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


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
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
