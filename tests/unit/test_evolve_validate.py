"""Parsing of evolve answers, validation reasons and the near-duplicate index."""

from __future__ import annotations

import random

import pytest

from eva_ray.evolve.operators import INPUT_MARKER, METHOD_HEADING, OUTPUT_MARKER
from eva_ray.evolve.validate import (
    DUPLICATE_IN_BUFFER,
    ECHOED_MARKER,
    EMPTY,
    NEAR_DUPLICATE_BUFFER,
    NEAR_DUPLICATE_PARENT,
    TOO_LONG,
    TOO_SHORT,
    EvolveValidator,
    NearDuplicateIndex,
    normalize,
    parse_evolved,
)

_RNG = random.Random(0)
_VOCAB = ["".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_RNG.randint(3, 8))) for _ in range(3000)]


def random_prompt(rng: random.Random, words: int = 30) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(words)) + "?"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Plain prompt.  ", "Plain prompt."),
        ("```\nFenced prompt\n```", "Fenced prompt"),
        ("```text\n\"Fenced and quoted\"\n```", "Fenced and quoted"),
        (f"{OUTPUT_MARKER}\nMarked prompt", "Marked prompt"),
        ("#Rewritten Prompt#: Paper marker", "Paper marker"),
        ("**New Prompt:** Bold label", "Bold label"),
        ("Rewritten prompt: Loose label", "Loose label"),
        ("Sure! Here is the new prompt: Chatty", "Chatty"),
        # SmolLM2-135M-Instruct's habits.
        ("- The new prompt: Bulleted label", "Bulleted label"),
        ("The new prompt reads: Linking verb", "Linking verb"),
        ("Closing hashes? ###", "Closing hashes?"),
        ("C# and F# are languages", "C# and F# are languages"),
        ("The new prompt is long", "The new prompt is long"),
        ("\u201cCurly quoted\u201d", "Curly quoted"),
        ('"What does "idempotent" mean?"', 'What does "idempotent" mean?'),
        (f"Answer first.\n\n{INPUT_MARKER}\nthe parent again", "Answer first."),
        ("Let me think about it...\n#Created Prompt#:\nAfter reasoning", "After reasoning"),
        (f"{INPUT_MARKER}\nparent\n{OUTPUT_MARKER}\nAfter echo", "After echo"),
        # Content that only looks like wrapping stays.
        ('"a" and "b" are letters', '"a" and "b" are letters'),
        ("New prompt engineering tricks?", "New prompt engineering tricks?"),
        ("```py\na = 1\n```\nWhy?\n```py\nb = 2\n```", "```py\na = 1\n```\nWhy?\n```py\nb = 2\n```"),
        ("", ""),
    ],
)
def test_parse_evolved(raw: str, expected: str) -> None:
    assert parse_evolved(raw) == expected


def test_normalize() -> None:
    assert normalize("  Hello,\n  WORLD!! ") == "hello world"
    assert normalize("?!...") == ""


def test_rejection_reasons_and_counter() -> None:
    v = EvolveValidator(min_chars=3)
    parent = "Explain how a refrigerator keeps food cold."
    cases = {
        "": EMPTY,
        "   \n ": EMPTY,
        "?!": EMPTY,  # nothing left after normalisation
        f"{INPUT_MARKER}\n{parent}": ECHOED_MARKER,  # the template came back instead of an answer
        f"Make it harder.\n{METHOD_HEADING} add rules": ECHOED_MARKER,
        "ok": TOO_SHORT,
        "x" * (len(parent) + 201): TOO_LONG,  # short parent: the absolute slack (200) is the bound
        "explain how a REFRIGERATOR keeps food cold": NEAR_DUPLICATE_PARENT,  # exact after normalisation
    }
    for text, reason in cases.items():
        assert v.check(text, parent) == (None, reason), text
    assert v.check("x" * (len(parent) + 200), parent)[1] is None  # slack is inclusive
    assert sum(v.rejections.values()) == len(cases)
    assert v.rejections[EMPTY] == 3 and v.rejections[ECHOED_MARKER] == 2
    assert v.accepted == 1


def test_length_bound_uses_ratio_for_long_parents_and_max_chars_cap() -> None:
    v = EvolveValidator(max_length_ratio=4.0, min_slack_chars=200, max_chars=5000)
    parent = "p" * 1000
    assert v.max_length(parent) == 4000
    assert v.reason("q" * 4000, parent) is None
    assert v.reason("q" * 4001, parent) == TOO_LONG
    assert v.max_length("p" * 2000) == 5000  # absolute cap wins over 4x


def test_near_duplicate_of_parent() -> None:
    rng = random.Random(1)
    v = EvolveValidator(parent_similarity=0.9)
    parent = random_prompt(rng, 60)
    one_word_changed = parent.replace(parent.split()[30], "zzzz", 1)
    assert v.reason(one_word_changed, parent) == NEAR_DUPLICATE_PARENT
    assert v.reason(random_prompt(rng, 60), parent) is None
    # A real rewrite that keeps the parent and adds a constraint of similar size is not a duplicate.
    assert v.reason(parent + " " + random_prompt(rng, 40), parent) is None


def test_buffer_exact_and_near_duplicates_register_unregister() -> None:
    rng = random.Random(2)
    v = EvolveValidator(buffer_similarity=0.95, max_length_ratio=100.0)  # length is not under test here
    parent = "unrelated parent prompt about knitting"
    held = random_prompt(rng, 80)
    v.register(held)
    assert v.reason(held.upper() + "!!", parent) == DUPLICATE_IN_BUFFER
    assert v.reason(held + " please", parent) == NEAR_DUPLICATE_BUFFER
    assert v.reason(random_prompt(rng, 80), parent) is None
    # Registering is idempotent: one unregister removes it, so it is acceptable again.
    v.register(held)
    v.unregister(held)
    assert len(v.index) == 0
    assert v.reason(held, parent) is None
    assert v.reason(held + " please", parent) is None
    v.unregister("never registered")  # ignored


def test_index_lookup_is_sublinear_and_finds_near_duplicates() -> None:
    rng = random.Random(3)
    index = NearDuplicateIndex(0.95)
    texts = [random_prompt(rng, 40) for _ in range(1500)]
    for t in texts:
        index.register(t)
    assert len(index) == 1500
    # An unrelated query verifies (almost) nothing exactly: it never scans the 1500 registered texts.
    assert index.most_similar(normalize(random_prompt(rng, 40))) < 0.5
    assert index.last_candidates <= 5
    found = 0
    for t in texts[:50]:
        sim = index.most_similar(normalize(t + " indeed"))
        found += sim >= 0.95
        assert index.last_candidates <= 5
    assert found == 50


def test_lsh_rows_keep_recall_at_the_threshold() -> None:
    for threshold in (0.7, 0.8, 0.9, 0.95, 0.99):
        idx = NearDuplicateIndex(threshold, num_perm=64)
        recall = 1 - (1 - threshold**idx.rows) ** idx.bands
        assert recall >= 0.99 and idx.rows * idx.bands == 64
    assert NearDuplicateIndex(0.95).rows > NearDuplicateIndex(0.7).rows  # stricter threshold, fewer candidates


def test_validator_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="buffer_similarity"):
        EvolveValidator(buffer_similarity=0.0)
    with pytest.raises(ValueError, match="length"):
        EvolveValidator(max_length_ratio=-1)


def test_echoed_share_counts_runs_of_words_not_common_letters() -> None:
    from eva_ray.evolve.validate import echoed_share

    instructions = ("Rework the original prompt so that answering it takes several explicit steps of thought, such "
                    "as intermediate calculations or a chain of deductions.")
    assert echoed_share("Rework the original prompt so that answering it takes several explicit steps.",
                        instructions) > 0.8
    # An ordinary prompt shares letters and short words with any English instruction, but no four-word runs.
    assert echoed_share("Write a short story about the original owner of a lighthouse, in several steps.",
                        instructions) < 0.2
    assert echoed_share("Too short", instructions) == 0.0
    v = EvolveValidator()
    assert v.reason("Rework the original prompt so that answering it takes several explicit steps of thought",
                    "parent", instructions) == "echoed_instruction"
    assert v.reason("Rework the original prompt so that answering it takes several explicit steps of thought",
                    "parent") is None  # without the instructions there is nothing to compare against
