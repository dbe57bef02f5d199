"""The offline rewriter (paper H.2.1): the request, the checks on the LLM's answer, and a batch through a fake
``complete`` (the LLM is not under test; the call policy and the checks are)."""

from __future__ import annotations

import asyncio

import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.evolve.calls import LLMCaller
from eva_ray.rewrite import (ECHOED_INSTRUCTION, EMPTY, INSTRUCTIONS, OUTPUT_MARKER, REFUSAL, REQUEST_MARKER,
                             RESPONSE_MARKER, REWRITE_REJECTIONS, TOO_LONG, TOO_SHORT, UNCHANGED, Rewriter,
                             RewriteCheck, looks_like_refusal, parse_rewrite, rewrite_messages)

ORIGINAL = ("Paris is the capital of France. It lies on the Seine and has been the seat of government for most of "
            "the country's history.")
BETTER = ("Paris is the capital of France. The city sits on the Seine, has housed the national government for "
          "centuries, and is home to the Elysee Palace and parliament.")


def response_of(messages: list[dict[str, str]]) -> str:
    user = messages[-1]["content"]
    return user.split(RESPONSE_MARKER + "\n", 1)[1].rsplit("\n\n" + OUTPUT_MARKER, 1)[0]


def test_the_request_carries_prompt_and_response_between_its_markers() -> None:
    messages = rewrite_messages("Where is Paris?", ORIGINAL)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert f"{REQUEST_MARKER}\nWhere is Paris?\n\n{RESPONSE_MARKER}\n{ORIGINAL}\n\n{OUTPUT_MARKER}\n" in user
    assert user.endswith(OUTPUT_MARKER + "\n") and response_of(messages) == ORIGINAL
    assert "as long as" in user  # the length the checks hold the answer to is asked for
    folded = rewrite_messages("Where is Paris?", ORIGINAL, system=False)
    assert len(folded) == 1 and folded[0]["content"].startswith(messages[0]["content"] + "\n\n")


def test_parsing_drops_a_preface_and_an_echoed_output_marker_only() -> None:
    assert parse_rewrite(f"  Sure! Here is the improved response: {BETTER}\n") == BETTER
    assert parse_rewrite(f"**Improved response:** {BETTER}") == BETTER
    assert parse_rewrite(f"{REQUEST_MARKER} x {OUTPUT_MARKER}\n{BETTER}") == BETTER
    # Words that only look like a label stay: there is no separator after them.
    assert parse_rewrite("Improved response times come from caching.") == "Improved response times come from caching."
    # Code fences are content (the original may be code): kept.
    assert parse_rewrite("```python\nprint(1)\n```") == "```python\nprint(1)\n```"


@pytest.mark.parametrize("answer, reason", [
    ("", EMPTY),
    ("  \n ... ", EMPTY),
    (f"{RESPONSE_MARKER}\n{BETTER}", ECHOED_INSTRUCTION),
    (INSTRUCTIONS.split("\n", 3)[2] + " " + INSTRUCTIONS.split("\n", 4)[3], ECHOED_INSTRUCTION),
    ("I'm sorry, but I can't help with rewriting this response as it stands, it would not be right.", REFUSAL),
    ("As an AI language model, I cannot improve this text any further than it is already written.", REFUSAL),
    (ORIGINAL.upper().replace(".", "!"), UNCHANGED),
    ("Paris.", TOO_SHORT),
    (BETTER * 3, TOO_LONG),
])
def test_each_bad_answer_is_dropped_with_its_reason(answer: str, reason: str) -> None:
    check = RewriteCheck()
    assert check.check(answer, ORIGINAL) == (None, reason)
    assert reason in REWRITE_REJECTIONS


def test_a_good_answer_passes_and_a_refusal_may_stay_a_refusal() -> None:
    assert RewriteCheck().check(f"Here is the improved response: {BETTER}", ORIGINAL) == (BETTER, None)
    refused = "I'm sorry, I can't help with that request."
    firmer = "I'm sorry, but I can't help with that request, since it asks for something harmful."
    assert looks_like_refusal(refused) and looks_like_refusal("\u201cI\u2019m sorry\u201d")
    assert not looks_like_refusal("I can see three ways to do this.")
    assert RewriteCheck().check(firmer, refused) == (firmer, None)


def test_the_length_bounds_are_knobs() -> None:
    short = "Paris, on the Seine, is France's capital."
    assert RewriteCheck().check(short, ORIGINAL) == (None, TOO_SHORT)
    assert RewriteCheck(min_ratio=0.3).check(short, ORIGINAL) == (short, None)
    assert RewriteCheck(max_ratio=4.0).check(BETTER * 3, ORIGINAL) == (BETTER * 3, None)
    with pytest.raises(ValueError, match="min_ratio"):
        RewriteCheck(min_ratio=1.5)


class RateLimitError(Exception):
    """Named like LiteLLM's: a passing cause, retried."""


class AuthenticationError(Exception):
    """Named like LiteLLM's: not retried."""


def test_a_batch_counts_every_request_and_keeps_order_and_never_raises() -> None:
    attempts: dict[str, int] = {}
    in_flight = {"now": 0, "max": 0}
    originals = [f"{ORIGINAL} (case {i})" for i in range(8)]

    async def complete(messages: list[dict[str, str]]) -> object:
        response = response_of(messages)
        case = int(response.rsplit("(case ", 1)[1].rstrip(")"))
        attempts[response] = attempts.get(response, 0) + 1
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        try:
            await asyncio.sleep(0.01)
            if case == 1:
                return ""  # empty
            if case == 2:
                return response * 5  # far too long
            if case == 3:
                raise AuthenticationError("bad key")  # fails at once
            if case == 4 and attempts[response] == 1:
                raise RateLimitError("slow down")  # once, then answers
            if case == 5:
                return 42  # not text
            if case == 6:
                raise ConnectionError("reset")  # every attempt
            return f"{BETTER} (case {case})"
        finally:
            in_flight["now"] -= 1

    rewriter = Rewriter(LLMCaller(complete, max_concurrency=3, max_retries=1, retry_backoff_s=0.0))
    result = asyncio.run(rewriter.rewrite([f"prompt {i}" for i in range(8)], originals))
    texts = result.texts
    assert texts[0] == f"{BETTER} (case 0)" and texts[4] == f"{BETTER} (case 4)" and texts[7] == f"{BETTER} (case 7)"
    assert [i for i, t in enumerate(texts) if t is None] == [1, 2, 3, 5, 6]
    out = result.to_dict()
    assert out["texts"] == texts
    assert out["counts"] == {"requested": 8, "ok": 3, "rejected": {EMPTY: 1, TOO_LONG: 1},
                             "failed": {"auth": 1, "bad_answer": 1, "connection": 1},
                             "retried": {"rate_limit": 1, "connection": 1}}
    c = out["counts"]
    assert c["ok"] + sum(c["rejected"].values()) + sum(c["failed"].values()) == c["requested"]
    assert 1 < in_flight["max"] <= 3  # concurrent, and never more than the caller's limit


def test_a_hung_call_times_out_and_counts_as_failed() -> None:
    async def hangs(messages: list[dict[str, str]]) -> str:
        await asyncio.sleep(10)
        return "never"

    result = asyncio.run(Rewriter(LLMCaller(hangs, timeout_s=0.05)).rewrite(["p"], [ORIGINAL]))
    assert result.texts == [None] and dict(result.counts.failed) == {"timeout": 1}


def test_mismatched_inputs_are_the_callers_error() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        asyncio.run(Rewriter(LLMCaller(None)).rewrite(["a", "b"], ["x"]))


def test_config_rewrite_needs_the_evolve_model_and_sane_bounds() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["reward.function=a.b:c", "offline.rewrite=true", "evolve.model="])
    assert "offline.rewrite" in str(err.value) and "evolve.model" in str(err.value)
    cfg = load_config(None, ["reward.function=a.b:c", "offline.rewrite=true", "evolve.model=gemini/x",
                             "offline.rewrite_min_ratio=0.3", "offline.rewrite_max_ratio=3"])
    check = RewriteCheck.from_config(cfg.offline)
    assert (check.min_ratio, check.max_ratio) == (0.3, 3.0)
    for bad in ("offline.rewrite_min_ratio=1.5", "offline.rewrite_max_ratio=0.9"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, ["reward.function=a.b:c", bad])
