"""An LLM judge for the tree best-of-N evolver: rates how demanding and how well-posed a prompt is.

The paper's tree-BoN keeps, at every level, the candidate a complexity-and-quality scorer likes best (Fig. 11,
appendix E rates prompts from 1 to 5 with an LLM). This judge asks the same evolve LLM for one number on that scale
and parses it; an answer without a usable number raises, which the evolver counts as a failed score.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from eva_ray.evolve.evolver import Complete

_RATING = re.compile(r"\b([1-5])\b")

_JUDGE_INSTRUCTION = (
    "Rate the prompt below as a training task for an AI assistant. Consider together how much careful thought a "
    "strong answer needs and how clear, sensible and answerable the request is. Use a whole number from 1 (trivial "
    "or badly posed) to 5 (demanding and well posed). Reply with the number only."
)


class UnparseableRating(ValueError):
    """The judge's answer held no rating from 1 to 5."""


def parse_rating(answer: str) -> float:
    match = _RATING.search(answer or "")
    if match is None:
        raise UnparseableRating(f"no rating 1-5 in {answer[:80]!r}")
    return float(match.group(1))


def judge_messages(prompt_text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{_JUDGE_INSTRUCTION}\n\nPrompt:\n{prompt_text}\n\nRating:"}]


def llm_judge_scorer(complete: Complete) -> Callable[[str], Awaitable[float]]:
    """A tree-BoN scorer backed by ``complete``: prompt text in, a rating from 1 to 5 out."""

    async def score(prompt_text: str) -> float:
        return parse_rating(await complete(judge_messages(prompt_text)))

    return score
