"""Rollouts: what a rollout worker hands back for one sampled response, and how a batch is split across workers.

A rollout backend (``actors/hf_backend.py``, ``actors/vllm_backend.py``) takes a :class:`Sampling` and returns one
:class:`Sample` per response; the worker turns each into a :class:`Rollout`.

A :class:`Rollout` is one response to one prompt, in both token ids (what the learner trains on) and text (what the
reward model and the creator read), stamped with the policy version whose weights sampled it so the driver can drop
or down-weight stale samples.

The driver's rollout group splits a prompt batch across N workers with :func:`shard` and puts the answers back in
prompt order with :func:`unshard`:

    shards = shard(prompts, n_workers)                     # contiguous, sizes differ by at most one
    answers = [w.generate(s, n) for w, s in zip(workers, shards)]
    rollouts = unshard(answers)                            # == one worker's answer to the whole batch, in order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

FINISH_REASONS: tuple[str, ...] = ("stop", "length")
"""``stop``: the policy emitted an end-of-sequence token; ``length``: it ran into ``max_new_tokens``."""


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled. ``temperature=0`` means greedy decoding (vLLM's convention)."""

    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass
class Sample:
    """One response as an engine returns it: tokens, why it ended, and each token's behaviour log-prob."""

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float]


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_id: str
    """Id of the :class:`~eva_ray.records.PromptRecord` this answers."""
    prompt_token_ids: list[int]
    """The chat-formatted prompt as the policy saw it (after left truncation), without padding."""
    response_token_ids: list[int]
    """The sampled tokens without padding. When ``finish_reason`` is ``stop`` the last id is the end-of-sequence
    token: it is kept so the learner also trains the decision to stop."""
    text: str
    """The response decoded without special tokens (no end-of-sequence marker)."""
    finish_reason: str
    """One of :data:`FINISH_REASONS`."""
    policy_version: int
    """Version of the weights that sampled this response (0: the initial policy)."""
    logprobs: list[float] | None = None
    """Behaviour log-prob of each response token under the distribution it was sampled from (after temperature and
    top-p; plain softmax for greedy decoding), one per ``response_token_ids`` entry; NaN where the engine gave none."""

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"rollout of prompt {self.prompt_id!r}: finish_reason {self.finish_reason!r} "
                             f"is not one of {FINISH_REASONS}")


def shard(items: Sequence[T], n_workers: int) -> list[list[T]]:
    """Split ``items`` into ``n_workers`` contiguous parts whose sizes differ by at most one.

    The first ``len(items) % n_workers`` parts get the extra item. When there are fewer items than workers the last
    parts are empty (a worker given an empty part can be skipped). Contiguity is what lets :func:`unshard` restore
    the original order by concatenation.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    base, extra = divmod(len(items), n_workers)
    parts: list[list[T]] = []
    start = 0
    for i in range(n_workers):
        size = base + (1 if i < extra else 0)
        parts.append(list(items[start:start + size]))
        start += size
    return parts


def unshard(parts: Sequence[Sequence[T]], sizes: Sequence[int] | None = None) -> list[T]:
    """Inverse of :func:`shard`: concatenate the workers' answers in worker order.

    ``sizes``, when given, are the lengths of the shards that were sent; a worker that answered a different number
    of prompts raises here instead of silently shifting every later answer onto the wrong prompt.
    """
    if sizes is not None:
        got = [len(part) for part in parts]
        if got != list(sizes):
            raise ValueError(f"unshard: workers answered {got} items for shards of sizes {list(sizes)}")
    return [item for part in parts for item in part]


def response_texts(groups: Sequence[Sequence[Rollout]]) -> list[list[str]]:
    """The texts of ``generate``'s answer, shaped as the reward actor's ``score`` takes them."""
    return [[r.text for r in group] for group in groups]
