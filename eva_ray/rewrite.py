"""The rewriter of offline eva (paper, appendix H.2.1): an LLM improves each prompt's chosen response before pairing.

For every prompt ``x`` of an iteration the best response ``y+`` goes to the evolve LLM with an instruction to make it
more helpful, more relevant, deeper in its reasoning, more creative and more detailed while keeping about its
length; training then uses ``(x, y+', y-)``. The wording of the instruction is ours (:func:`rewrite_messages`).

What the LLM sends back is untrusted, and a bad rewrite would be trained on as the *preferred* answer, so every
answer is checked (:class:`RewriteCheck`) and a doubtful one is dropped rather than repaired: the caller then keeps
``y+`` as it was. Each request ends as exactly one of *ok*, *rejected* (by reason, :data:`REWRITE_REJECTIONS`) or
*failed* (by cause of the LLM call, :func:`eva_ray.evolve.calls.failure_cause`), so
``ok + rejected + failed == requested``. Nothing an answer or a call does raises.

    rewriter = Rewriter(LLMCaller.from_config(complete, cfg.evolve), RewriteCheck.from_config(cfg.offline))
    result = await rewriter.rewrite(prompt_texts, chosen_texts)
    result.texts      # one per pair: the rewritten response, or None (keep the original)
    result.counts     # EvolveCounts: requested, ok, rejected by reason, failed and retried by cause

The creator actor (``actors/creator.py``, ``Creator.rewrite``) binds the evolve LLM through LiteLLM and runs this.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eva_ray.evolve.calls import LLMCaller
from eva_ray.evolve.evolver import EvolveCounts
from eva_ray.evolve.validate import echoed_share, normalize

if TYPE_CHECKING:
    from eva_ray.config import OfflineConfig

Message = dict[str, str]

# --- the request ---------------------------------------------------------------------------------------------------
REQUEST_MARKER = "#User Request#"
RESPONSE_MARKER = "#Current Response#"
OUTPUT_MARKER = "#Improved Response#"
_MARKERS = (REQUEST_MARKER, RESPONSE_MARKER, OUTPUT_MARKER)

_ROLE = "You edit answers written by an AI assistant and make them better without changing what they are for."
_TASK = "\n".join((
    "Below is a request a user sent and the response an assistant wrote for it. Write an improved version of that "
    "response. Compared with the current one, the improved response should:",
    "- help the user more: answer exactly what was asked, completely and correctly;",
    "- stay on the point of the request, leaving out what does not serve it;",
    "- reason more deeply: where a conclusion needs support, show the steps that lead to it;",
    "- be more creative and more specific, with concrete details, examples or explanations where they add value;",
    "- be about as long as the current response, neither much shorter nor much longer.",
    "Keep what is already correct and useful, keep the language and the format of the current response (code stays "
    "code, a list stays a list), and never mention that the response was revised. Reply with the improved response "
    "only: no introduction, no notes, no heading.",
))


def rewrite_messages(prompt: str, response: str, *, system: bool = True) -> list[Message]:
    """The chat messages asking the LLM to improve ``response`` to ``prompt``.

    ``system=False`` folds the role line into the user turn, for chat templates without a system role (Gemma's).
    """
    body = f"{_TASK}\n\n{REQUEST_MARKER}\n{prompt}\n\n{RESPONSE_MARKER}\n{response}\n\n{OUTPUT_MARKER}\n"
    if system:
        return [{"role": "system", "content": _ROLE}, {"role": "user", "content": body}]
    return [{"role": "user", "content": f"{_ROLE}\n\n{body}"}]


INSTRUCTIONS = "\n".join((_ROLE, _TASK, *_MARKERS))
"""The request's own wording, without the prompt and the response: what an answer that echoes its task repeats."""


# --- parsing -------------------------------------------------------------------------------------------------------
_OUTPUT_RE = re.compile(r"#\s*(?:improved|rewritten|revised|new)\s+response\s*#\s*:?", re.IGNORECASE)
_ANY_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS), re.IGNORECASE)
# A chatty model's preface ("Sure! Here is the improved response:"): a separator is required, so an answer that
# merely starts with the words "Improved response times ..." survives.
_BOLD = r"(?:\*\*|__)?"
_LEADING_LABEL_RE = re.compile(
    rf"^\s*(?:(?:sure|okay|ok|certainly|of course)[,.!]?\s*)?{_BOLD}\s*"
    rf"(?:here(?:'s|\s+is)\s+(?:the|an?|my|your)\s+|the\s+)?"
    rf"(?:(?:improved|rewritten|revised|better|enhanced|updated)\s+)+(?:version(?:\s+of\s+the\s+response)?|"
    rf"response|answer)\s*{_BOLD}\s*[:\-\u2013\u2014]\s*{_BOLD}\s*",
    re.IGNORECASE,
)


def parse_rewrite(raw: str) -> str:
    """The response inside an answer: an echoed output marker and a leading preface removed, whitespace trimmed."""
    s = (raw or "").strip()
    last = None
    for last in _OUTPUT_RE.finditer(s):
        pass
    if last is not None:  # the model re-typed the frame before answering: the answer follows its last marker
        s = s[last.end():]
    return _LEADING_LABEL_RE.sub("", s, count=1).strip()


# --- checks --------------------------------------------------------------------------------------------------------
EMPTY = "empty"
ECHOED_INSTRUCTION = "echoed_instruction"
REFUSAL = "refusal"
UNCHANGED = "unchanged"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
REWRITE_REJECTIONS: tuple[str, ...] = (EMPTY, ECHOED_INSTRUCTION, REFUSAL, UNCHANGED, TOO_SHORT, TOO_LONG)
"""Why a rewrite is dropped, in the order they are checked."""

# How an assistant's refusal opens. Only the opening is read: "I can't stress enough ..." deep inside an answer is
# not a refusal, and a refusal that is not at the start is rare enough to leave to the length checks.
_REFUSAL_RE = re.compile(
    r"^\W*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry[,.!]|i\s+apologi[sz]e|unfortunately,?\s+i|"
    r"i\s+(?:can(?:'|no)?t|cannot|won'?t|will\s+not|am\s+unable|am\s+not\s+able|'m\s+unable|'m\s+not\s+able)|"
    r"i'm\s+(?:unable|not\s+able)|as\s+an\s+ai\b)",
    re.IGNORECASE,
)


def looks_like_refusal(text: str) -> bool:
    """Whether ``text`` opens the way an assistant declines a request."""
    return bool(_REFUSAL_RE.match(text.replace("\u2019", "'")))


@dataclass(frozen=True)
class RewriteCheck:
    """Decides whether a parsed rewrite may replace the chosen response.

    Length is measured in characters against the original: a rewrite below ``min_ratio`` or above ``max_ratio``
    times its length is dropped (the paper asks for a similar length; a preference pair whose chosen side is much
    longer mostly teaches length). A refusal is dropped only when the original was not one itself. An answer whose
    word 4-grams are at least ``instruction_echo`` from the instruction is the model repeating its task.
    """

    min_ratio: float = 0.5
    max_ratio: float = 2.0
    instruction_echo: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= 1 <= self.max_ratio:
            raise ValueError(f"need 0 < min_ratio <= 1 <= max_ratio, got {self.min_ratio}, {self.max_ratio}")
        if not 0 < self.instruction_echo <= 1:
            raise ValueError(f"instruction_echo must be in (0, 1], got {self.instruction_echo}")

    @classmethod
    def from_config(cls, cfg: OfflineConfig) -> RewriteCheck:
        return cls(min_ratio=cfg.rewrite_min_ratio, max_ratio=cfg.rewrite_max_ratio)

    def reason(self, text: str, original: str, instructions: str = INSTRUCTIONS) -> str | None:
        """Why the parsed rewrite ``text`` of ``original`` is dropped (one of :data:`REWRITE_REJECTIONS`), or None."""
        norm = normalize(text)
        if not norm:
            return EMPTY
        if _ANY_MARKER_RE.search(text) or (instructions and echoed_share(text, instructions) >= self.instruction_echo):
            return ECHOED_INSTRUCTION
        if looks_like_refusal(text) and not looks_like_refusal(original.strip()):
            return REFUSAL
        if norm == normalize(original):
            return UNCHANGED
        if len(text) < self.min_ratio * len(original.strip()):
            return TOO_SHORT
        if len(text) > self.max_ratio * len(original.strip()):
            return TOO_LONG
        return None

    def check(self, raw: str, original: str, instructions: str = INSTRUCTIONS) -> tuple[str | None, str | None]:
        """Parse a raw answer and check it: ``(text, None)`` or ``(None, reason)``."""
        text = parse_rewrite(raw)
        why = self.reason(text, original, instructions)
        return (None, why) if why is not None else (text, None)


# --- the batch -----------------------------------------------------------------------------------------------------
@dataclass
class RewriteResult:
    """One rewrite per pair (None: dropped or failed, keep the original) and where every request went."""

    texts: list[str | None]
    counts: EvolveCounts

    def to_dict(self) -> dict[str, Any]:
        """What ``Creator.rewrite`` returns: ``{"texts": [...], "counts": {"requested", "ok", "rejected",
        "failed", "retried"}}`` (the last three map a reason or cause to its count)."""
        c = self.counts
        return {"texts": list(self.texts),
                "counts": {"requested": c.requested, "ok": c.ok, "rejected": dict(c.rejected),
                           "failed": dict(c.failed), "retried": dict(c.retried)}}


class Rewriter:
    """Rewrites chosen responses through ``caller`` (concurrency, timeouts and retries are its policy)."""

    def __init__(self, caller: LLMCaller, check: RewriteCheck | None = None, *, system_message: bool = True) -> None:
        self.caller = caller
        self.check = check or RewriteCheck()
        self.system_message = system_message

    async def rewrite(self, prompts: Sequence[str], responses: Sequence[str]) -> RewriteResult:
        """Rewrite ``responses[i]`` (the chosen response to ``prompts[i]``) for every i, concurrently."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses to rewrite")
        counts = EvolveCounts(requested=len(prompts))
        requests = [rewrite_messages(p, r, system=self.system_message) for p, r in zip(prompts, responses)]
        raws = await asyncio.gather(*(self.caller.call(m, counts) for m in requests))
        texts: list[str | None] = []
        for response, raw in zip(responses, raws):
            if isinstance(raw, BaseException):  # counted by the caller under its cause
                texts.append(None)
                continue
            text, why = self.check.check(raw, response, INSTRUCTIONS)
            if text is None:
                counts.rejected[why] += 1
            else:
                counts.ok += 1
            texts.append(text)
        return RewriteResult(texts, counts)
