"""Evolve operators, meta-prompt styles and seeded operator choice."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from eva_ray.evolve.operators import (
    IN_BREADTH,
    IN_DEPTH,
    INPUT_MARKER,
    OPERATORS,
    OUTPUT_MARKER,
    STYLES,
    build_messages,
    choose_operators,
)

PARENT = "Write a haiku about the first snow in Kyoto.\n\n```python\nprint('keep me')\n```"

# Sentences of the paper's / EvolInstruct's templates: ours must say the same things in other words.
PAPER_SENTENCES = (
    "Add one or more reasoning steps into the '#Given Prompt#'.",
    "Please act as an expert Prompt Rewriter.",
    "Please act as an expert Prompt Creator.",
    "Replace general concepts in the #Given Prompt# with more specific and detailed concepts.",
    "Reframe the #Given Prompt# as if written by a user with a completely different persona",
    "Shift the high-level idea of the #Given Prompt#",
    "Combine the high-level concept of the #Given Prompt# with elements from a different domain.",
    "The #Rewritten Prompt# must sound like a real human user's prompt",
    "#Given Prompt#",
)


def test_paper_operator_sets_have_the_right_kinds() -> None:
    assert IN_BREADTH == ("persona", "shift-in", "shift-out", "mix", "abstract")
    assert IN_DEPTH == ("constraints", "deepening", "concretizing", "reasoning", "expansion")
    assert all(OPERATORS[n].kind == "breadth" for n in IN_BREADTH)
    assert all(OPERATORS[n].kind == "depth" for n in IN_DEPTH)
    assert all(op.name == name and op.instruction for name, op in OPERATORS.items())
    # Every style's operators exist, and single-operator styles record the style name as the operator.
    for style in STYLES.values():
        assert set(style.operators) <= set(OPERATORS)
        assert {OPERATORS[n].kind for n in style.operators} <= set(style.frames)
        if len(style.operators) == 1:
            assert style.operators == (style.name,)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_renders_parent_instruction_and_markers(style: str) -> None:
    for op in STYLES[style].operators:
        msgs = build_messages(PARENT, op, style)
        assert [m["role"] for m in msgs] == ["system", "user"]
        user = msgs[-1]["content"]
        assert OPERATORS[op].instruction in user
        # The parent sits, verbatim (code block included), between the two markers, and the answer is expected
        # right after the output marker.
        assert user.index(INPUT_MARKER) < user.index(PARENT) < user.index(OUTPUT_MARKER)
        assert user.rstrip().endswith(OUTPUT_MARKER)


def test_no_system_message_folds_role_into_user_turn() -> None:
    with_sys = build_messages(PARENT, "persona", "eva")
    folded = build_messages(PARENT, "persona", "eva", system=False)
    assert [m["role"] for m in folded] == ["user"]
    assert folded[0]["content"].startswith(with_sys[0]["content"])
    assert with_sys[1]["content"] in folded[0]["content"]


def test_eva_uses_a_rewriter_frame_for_depth_and_a_creator_frame_for_breadth() -> None:
    depth = build_messages(PARENT, "reasoning", "eva")[1]["content"]
    breadth = build_messages(PARENT, "mix", "eva")[1]["content"]
    assert "harder" in depth and "brand-new" not in depth
    assert "brand-new" in breadth and "harder" not in breadth
    # Non-prose parts are protected when rewriting; length is bounded in both.
    assert "code" in depth and "length" in depth and "length" in breadth


def test_our_wording_is_not_the_papers() -> None:
    texts = [op.instruction for op in OPERATORS.values()]
    texts += [build_messages(PARENT, op, s)[i]["content"] for s in STYLES for op in STYLES[s].operators for i in (0, 1)]
    for sentence in PAPER_SENTENCES:
        assert not any(sentence.lower() in t.lower() for t in texts), sentence


def test_style_rejects_foreign_and_unknown_operators() -> None:
    with pytest.raises(ValueError, match="allowed.*evol_quality"):
        build_messages(PARENT, "persona", "evol_quality")
    with pytest.raises(ValueError, match="unknown evolve style"):
        build_messages(PARENT, "persona", "no_such_style")


@pytest.mark.parametrize("make_rng", [lambda: np.random.default_rng(3), lambda: random.Random(3)])
def test_choose_operators_is_seeded_and_uniform(make_rng) -> None:
    a = choose_operators(make_rng(), 5000, IN_DEPTH)
    assert a == choose_operators(make_rng(), 5000, IN_DEPTH)
    freq = Counter(a)
    assert set(freq) == set(IN_DEPTH)
    assert all(800 < c < 1200 for c in freq.values()), freq  # 1000 expected each; ~7 sigma margin
    assert choose_operators(make_rng(), 0, IN_DEPTH) == []


def test_choose_operators_validates() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="allowed:.*persona"):
        choose_operators(rng, 2, ["persona", "telepathy"])
    with pytest.raises(ValueError, match="at least one"):
        choose_operators(rng, 2, [])
    with pytest.raises(ValueError, match="negative"):
        choose_operators(rng, -1, ["persona"])
