"""The rollout worker's Hugging Face backend: ``transformers`` ``generate``, on CPU or GPU.

``static_cache=True`` compiles a static KV cache: much faster decoding on a GPU after a long warm-up, pointless on
CPU. Behaviour log-probs are recorded by a logits processor that applies temperature and top-p itself (see
:func:`_behaviour_logprobs_processor`). Weights from the channel are copied into the model's parameters in place.
The backend interface it shares with :class:`actors.vllm_backend.VLLMBackend` takes a
:class:`~eva_ray.rollouts.Sampling` and returns :class:`~eva_ray.rollouts.Sample` records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from actors.weight_channel import ChannelSpec, WeightChannel, receive_into
from eva_ray.attention import attention_implementation
from eva_ray.rollouts import Sample, Sampling
from eva_ray.weights import TensorSpec, fingerprint

_SHOW = 5  # how many offending names an error message lists


def cut_at_eos(token_ids: Sequence[int], eos_ids: frozenset[int],
               logprobs: Sequence[float] | None = None) -> Sample:
    """Keep the tokens (and their log-probs) up to and including the first end-of-sequence token.

    What follows the first EOS in a batched ``generate`` output is padding. Without an EOS the response ran into the
    token limit and is returned whole.
    """
    logprobs = list(logprobs) if logprobs is not None else [math.nan] * len(token_ids)
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return Sample(list(token_ids[: i + 1]), "stop", logprobs[: i + 1])
    return Sample(list(token_ids), "length", logprobs)


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
        self.check_shapes({name: tuple(t.shape) for name, t in state_dict.items()})

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], what: str = "the state dict") -> None:
        """Every parameter named once (tied aliases count once), no unknown name, every shape right."""
        unknown = sorted(set(shapes) - self.known)
        missing = sorted(group[0] for group in self.alias_groups if not any(n in shapes for n in group))
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown name(s): {_names(unknown)}")
        if missing:
            problems.append(f"{len(missing)} missing parameter(s): {_names(missing)}")
        if problems:
            example = _names(sorted(self.shapes))
            raise ValueError(f"{what} does not match the policy ({'; '.join(problems)}). "
                             f"The policy's names look like: {example}")
        wrong = [f"{n} {shape} != {self.shapes[n]}" for n, shape in shapes.items()
                 if n in self.shapes and tuple(shape) != self.shapes[n]]
        if wrong:
            raise ValueError(f"{what}: {len(wrong)} shape mismatch(es): {_names(wrong)}")


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


# ---------------------------------------------------------------------------------------------------------- backends


def _behaviour_logprobs_processor(sampling: Sampling | None) -> Any:
    """A logits processor that warps the logits itself and records each sampled token's log-prob under them.

    transformers applies its own temperature / top-p warpers *after* any custom processor, so a custom processor
    never sees the distribution that is sampled. Instead ``generate`` runs with no warpers of its own and this one
    applies temperature and top-p, so the log-probs it records are, by construction, those of the sampling
    distribution. At step t it sees the token sampled at step t - 1 (the last column of ``input_ids``) and keeps only
    one ``[rows, vocab]`` log-softmax alive. ``sampling`` None: greedy, the logits pass unchanged.
    """
    from transformers import LogitsProcessor

    class BehaviourLogprobs(LogitsProcessor):
        def __init__(self) -> None:
            self.steps: list[torch.Tensor] = []
            self._last: torch.Tensor | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self._last is not None:
                self.steps.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
            if sampling is not None:
                scores = _top_p_filter(scores / sampling.temperature, sampling.top_p)
            self._last = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def result(self, new_tokens: torch.Tensor) -> list[list[float]]:
            """``[rows][steps]`` log-probs of ``new_tokens`` (the generated columns of ``generate``'s output)."""
            if self._last is not None and len(self.steps) < new_tokens.shape[1]:
                self.steps.append(self._last.gather(1, new_tokens[:, -1:].to(self._last.device)).squeeze(1))
            if not self.steps:
                return [[] for _ in range(new_tokens.shape[0])]
            return torch.stack(self.steps, dim=1).tolist()

    return BehaviourLogprobs()


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches ``top_p``; keeps at least one."""
    if top_p >= 1.0:
        return scores
    ascending, order = scores.sort(dim=-1)
    outside = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
    outside[..., -1] = False  # the most likely token always stays
    return scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


class HFBackend:
    """``transformers`` generate."""

    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, static_cache: bool,
                 eos_ids: frozenset[int], pad_id: int, trust_remote_code: bool) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.device = device
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.static_cache = static_cache
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        # The attention the learner uses too: a soft-capped model (Gemma-2) must not sample from uncapped attention.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attention_implementation(config)).to(device).eval()
        # A checkpoint's generation_config.json may carry top_k, repetition_penalty and the like. They would silently
        # move the sampling distribution away from the plain temperature/top-p one the learner's log-probs assume.
        self.model.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
        self.names = WeightNames(self.model)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._targets = {**dict(self.model.named_parameters(remove_duplicate=False)),
                         **dict(self.model.named_buffers())}
        self._channel: WeightChannel | None = None

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seed: int) -> list[list[Sample]]:
        input_ids, attention_mask = _left_pad(prompt_ids, self.pad_id, self.device)
        greedy = sampling.temperature == 0
        recorder = _behaviour_logprobs_processor(None if greedy else sampling)
        kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=sorted(self.eos_ids), do_sample=not greedy,
                                      logits_processor=[recorder])
        if not greedy:
            # The recorder applies temperature and top-p; transformers must add no warper of its own (top_k=0: its
            # global default is top_k=50).
            kwargs.update(num_return_sequences=n, temperature=1.0, top_p=1.0, top_k=0)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        with _seeded(seed, self.device), torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = out[:, input_ids.shape[1]:]
        new_tokens, logprobs = new.tolist(), recorder.result(new)
        # Sampling repeats each prompt n times in place (rows [i*n, (i+1)*n) answer prompt i); greedy decoding gives
        # one row per prompt, and its n responses are identical by definition.
        def row(i: int, j: int) -> int:
            return i if greedy else i * n + j

        return [[cut_at_eos(new_tokens[row(i, j)], self.eos_ids, logprobs[row(i, j)]) for j in range(n)]
                for i in range(len(prompt_ids))]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.names.check(state_dict)
        # load_state_dict copies into the existing tensors, casting dtype and moving device as needed.
        self.model.load_state_dict(dict(state_dict), strict=False)

    def channel_ranks(self) -> int:
        return 1

    def weights_fingerprint(self, manifest: list[list]) -> list[float]:
        specs = [TensorSpec.from_list(item) for item in manifest]
        return fingerprint(self._targets[spec.names[0]] for spec in specs)

    def join_weight_channel(self, spec: dict[str, Any], rank_offset: int) -> None:
        channel_spec = ChannelSpec.from_dict(spec)
        # Refuse a learner whose policy this model cannot hold before any sync is attempted.
        self.names.check_shapes({name: s.shape for s in channel_spec.specs() for name in s.names},
                                "the learner's weight manifest")
        self.leave_weight_channel()
        self._channel = WeightChannel(channel_spec, rank_offset)

    def leave_weight_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @torch.no_grad()
    def receive_weights(self) -> int:
        if self._channel is None:
            raise RuntimeError("receive_weights before join_weight_channel")

        def load(tensors: Iterator[tuple[TensorSpec, torch.Tensor]]) -> None:
            for spec, tensor in tensors:
                done: set[int] = set()
                for name in spec.names:
                    target = self._targets.get(name)
                    if target is not None and id(target) not in done:  # tied names share one tensor: copy once
                        target.copy_(tensor)
                        done.add(id(target))

        return receive_into(self._channel, load)

    def sleep(self, level: int) -> None:  # nothing to release: an HF model has no separate KV-cache pool
        pass

    def wake_up(self, tags: list[str] | None) -> None:
        pass

    def close(self) -> None:
        self.leave_weight_channel()
