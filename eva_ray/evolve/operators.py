"""Evolve operators and the meta-prompt frames that wrap them.

An *operator* is one way of turning a parent prompt into a child prompt (paper appendix F): in-breadth operators
make a *different* prompt (new persona, new topic, ...), in-depth operators make a *harder* version of the same
prompt. A *style* is a family of meta-prompts (eva's own, classic EvolInstruct, EvolComplexity, EvolQuality,
SelfInstruct): it says which operators it accepts and which frame (task, rules) surrounds the operator's
instruction for each operator kind.

All wording here is our own; it keeps each method's intent, not its sentences. Every style is plain data rendered
by one function, :func:`build_messages`, so the styles cannot drift apart in layout or in the markers the parser
(:mod:`eva_ray.evolve.validate`) relies on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Kind = Literal["breadth", "depth"]
Message = dict[str, str]

# The markers that fence the parent prompt and the expected answer in every frame. They are deliberately unusual
# (hash-delimited) so that finding one inside a model's answer means the model echoed the template; the validator
# imports these constants rather than repeating the strings.
INPUT_MARKER = "#Original Prompt#"
OUTPUT_MARKER = "#New Prompt#"
RULES_HEADING = "Rules for the new prompt:"
METHOD_HEADING = "Method to apply:"
TEMPLATE_MARKERS: tuple[str, ...] = (INPUT_MARKER, OUTPUT_MARKER, RULES_HEADING, METHOD_HEADING)
"""Template text that never belongs in an evolved prompt; seeing any of it in an answer means an echoed template."""


@dataclass(frozen=True)
class Operator:
    """One evolve method: its name (recorded on the child), its kind and the instruction given to the LLM."""

    name: str
    kind: Kind
    instruction: str


def _op(name: str, kind: Kind, instruction: str) -> Operator:
    return Operator(name=name, kind=kind, instruction=" ".join(instruction.split()))


IN_BREADTH: tuple[str, ...] = ("persona", "shift-in", "shift-out", "mix", "abstract")
IN_DEPTH: tuple[str, ...] = ("constraints", "deepening", "concretizing", "reasoning", "expansion")

_OPERATOR_LIST: tuple[Operator, ...] = (
    # --- in-breadth: a different prompt of similar difficulty --------------------------------------------------
    _op(
        "persona",
        "breadth",
        """Picture the original prompt being sent by somebody quite unlike its author: a different job, age, culture
        or level of expertise. Write the request that person would send instead. Let their voice, vocabulary and
        priorities reshape the wording and anything else that would naturally change, so that it reads as if a
        different person wrote it.""",
    ),
    _op(
        "shift-in",
        "breadth",
        """Stay inside the broad field of the original prompt but move to a neighbouring topic, sub-area or
        situation within that field. The new request should still call on the same kind of domain knowledge or
        reasoning.""",
    ),
    _op(
        "shift-out",
        "breadth",
        """Carry the core idea of the original prompt over to an unrelated subject and setting. The new request may
        need a similar style of thinking or of reading the context, but applied somewhere it has not been
        applied before.""",
    ),
    _op(
        "mix",
        "breadth",
        """Blend the central idea of the original prompt with ingredients borrowed from an unrelated field, producing
        an unfamiliar scenario that is still recognisably connected to where it started.""",
    ),
    _op(
        "abstract",
        "breadth",
        """Lift the original prompt to a more general level: drop its particular details but keep what it is really
        after, so that answering it means reasoning from principles rather than recalling specifics.""",
    ),
    # --- in-depth: the same prompt, made harder ----------------------------------------------------------------
    _op(
        "constraints",
        "depth",
        """Introduce one or more substantive requirements (rules, limits, conditions or background facts) that
        genuinely change what a good answer has to look like, rather than only its formatting.""",
    ),
    _op(
        "deepening",
        "depth",
        """Where the original prompt asks about something, widen and deepen what it asks: demand an answer that
        works through several layers, splits the problem into parts, or links ideas that do not obviously belong
        together.""",
    ),
    _op(
        "concretizing",
        "depth",
        """Swap vague or generic notions in the original prompt for precise, specific ones (for instance, 'a vehicle'
        could become 'a 2015 diesel hatchback with 180,000 km on the clock'), so that the task is sharply defined
        and leaves little to guess.""",
    ),
    _op(
        "reasoning",
        "depth",
        """Rework the original prompt so that answering it takes several explicit steps of thought, such as
        intermediate calculations, a chain of deductions, or a justification for each step, where a one-line
        answer used to be enough.""",
    ),
    _op(
        "expansion",
        "depth",
        """Widen the scope of the original prompt with extra viewpoints, related cases or further dimensions; for
        example, ask for a comparison across several situations instead of a single one.""",
    ),
    # --- operators that belong to one style --------------------------------------------------------------------
    _op(
        "extrapolate",
        "breadth",
        """Stay in the same domain as the original prompt but pick a rarer, more unusual topic or case within it,
        the kind of request that shows up far less often.""",
    ),
    _op(
        "evol_complexity",
        "depth",
        """Make the original prompt more complex, for example by requiring more steps of reasoning, adding
        conditions to satisfy, or asking for a more involved answer, while keeping it one coherent request.""",
    ),
    _op(
        "evol_quality",
        "depth",
        """Improve the original prompt as a request: make it more useful to answer, more to the point, deeper, more
        inventive and richer in relevant detail.""",
    ),
    _op(
        "self_instruct",
        "breadth",
        """Invent a new, self-contained task that the original prompt only inspires. Vary the main verb and the form
        (a question, an instruction, or a request mixing both) so that it does not copy the original's structure.""",
    ),
)

OPERATORS: Mapping[str, Operator] = {op.name: op for op in _OPERATOR_LIST}
"""Every operator by name. Names are what :attr:`PromptRecord.operator` records."""


# --- frames ------------------------------------------------------------------------------------------------------
# Rules shared by several frames live once, here, so styles that want the same constraint say it the same way.
_ANSWERABLE = "It must make sense and be something a knowledgeable person could actually answer."
_HUMAN_VOICE = "Write it the way a real person would type it; avoid wording that reads as machine-generated."
_KEEP_NON_TEXT = "Keep any code, tables, data or other non-prose parts of the original; never drop them."
_NEAR_LENGTH = "Stay close to the original's length: slightly longer is fine, padding is not."
_SAME_SIZE = "Aim for roughly the same length and difficulty as the original."
_NOT_A_PARAPHRASE = "Change it substantively as a whole, not a word here and there."
_SELF_CONTAINED = "It must stand on its own: understandable without ever seeing the original."
_REPLY_ONLY = "Reply with the new prompt only: no heading, no explanation, no quotation marks, no answer to it."


@dataclass(frozen=True)
class Frame:
    """The meta-prompt around an operator's instruction: who the LLM plays, what it must produce, which rules hold."""

    role: str
    task: str
    rules: tuple[str, ...]


@dataclass(frozen=True)
class Style:
    """A family of meta-prompts: which operators it accepts (``operators``, also its default set) and one frame
    per operator kind it supports."""

    name: str
    operators: tuple[str, ...]
    frames: Mapping[str, Frame]


_REWRITER = "You rewrite prompts that are used to train an AI assistant."
_CREATOR = "You write new prompts that are used to train an AI assistant."

STYLES: Mapping[str, Style] = {
    "eva": Style(
        name="eva",
        operators=IN_BREADTH + IN_DEPTH,
        frames={
            "depth": Frame(
                role=_REWRITER,
                task=(
                    "Turn the original prompt below into a more demanding version of itself, one that a capable "
                    "AI assistant would find somewhat harder to answer well."
                ),
                rules=(_ANSWERABLE, _KEEP_NON_TEXT, _NEAR_LENGTH, _HUMAN_VOICE, _NOT_A_PARAPHRASE,
                       "The result must be a genuinely harder task than the original."),
            ),
            "breadth": Frame(
                role=_CREATOR,
                task=(
                    "Use the original prompt below as a springboard for a brand-new prompt, so that the prompts "
                    "an assistant trains on cover more ground and more kinds of challenge."
                ),
                rules=(_SAME_SIZE, _ANSWERABLE, _HUMAN_VOICE, _NOT_A_PARAPHRASE),
            ),
        },
    ),
    "evol_instruct": Style(
        name="evol_instruct",
        operators=("constraints", "deepening", "concretizing", "reasoning", "extrapolate"),
        frames={
            "depth": Frame(
                role=_REWRITER,
                task="Rewrite the original prompt below so that well-known AI assistants find it a bit harder.",
                rules=(_ANSWERABLE, _KEEP_NON_TEXT,
                       "Add no more than about 10 to 20 words; do not let it become wordy."),
            ),
            "breadth": Frame(
                role=_CREATOR,
                task="Write a brand-new prompt drawn from the same domain as the original prompt below.",
                rules=(_SAME_SIZE, _ANSWERABLE),
            ),
        },
    ),
    "evol_complexity": Style(
        name="evol_complexity",
        operators=("evol_complexity",),
        frames={
            "depth": Frame(
                role=_REWRITER,
                task="Rewrite the original prompt below into a more complex version of itself.",
                rules=(_ANSWERABLE, _KEEP_NON_TEXT, _NEAR_LENGTH),
            )
        },
    ),
    "evol_quality": Style(
        name="evol_quality",
        operators=("evol_quality",),
        frames={
            "depth": Frame(
                role=_REWRITER,
                task="Rewrite the original prompt below into a better version of itself.",
                rules=(_ANSWERABLE, _KEEP_NON_TEXT, _NEAR_LENGTH),
            )
        },
    ),
    "self_instruct": Style(
        name="self_instruct",
        operators=("self_instruct",),
        frames={
            "breadth": Frame(
                role=_CREATOR,
                task="Write one new task for an AI assistant, taking the original prompt below only as inspiration.",
                rules=(_SAME_SIZE, _SELF_CONTAINED, _HUMAN_VOICE),
            )
        },
    ),
}
"""Meta-prompt styles by name (``eva`` is the paper's own)."""


def get_style(style: str | Style) -> Style:
    """The style named ``style``; a clear error naming the known styles otherwise."""
    if isinstance(style, Style):
        return style
    try:
        return STYLES[style]
    except KeyError:
        raise ValueError(f"unknown evolve style {style!r}; allowed: {sorted(STYLES)}") from None


def validate_operators(names: Sequence[str], style: str | Style | None = None) -> tuple[str, ...]:
    """Check operator names (and, given a style, that the style accepts them); returns them as a tuple."""
    names = tuple(names)
    if not names:
        raise ValueError("at least one evolve operator is needed")
    allowed = get_style(style).operators if style is not None else tuple(OPERATORS)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        where = f"style {get_style(style).name!r}" if style is not None else "evolve operators"
        raise ValueError(f"unknown operator(s) {unknown} for {where}; allowed: {list(allowed)}")
    return names


def build_messages(
    parent_text: str, operator: str | Operator, style: str | Style = "eva", *, system: bool = True
) -> list[Message]:
    """The chat messages asking an LLM to evolve ``parent_text`` with ``operator`` in ``style``.

    ``system=False`` folds the role line into the user turn, for chat templates that reject a system message
    (Gemma's, for one).
    """
    st = get_style(style)
    name = operator.name if isinstance(operator, Operator) else operator
    validate_operators([name], st)
    op = operator if isinstance(operator, Operator) else OPERATORS[name]
    frame = st.frames[op.kind]
    rules = "\n".join(f"- {r}" for r in (*frame.rules, _REPLY_ONLY))
    body = (
        f"{frame.task}\n\n"
        f"{RULES_HEADING}\n{rules}\n\n"
        f"{METHOD_HEADING}\n{op.instruction}\n\n"
        f"{INPUT_MARKER}\n{parent_text}\n\n"
        f"{OUTPUT_MARKER}\n"
    )
    if system:
        return [{"role": "system", "content": frame.role}, {"role": "user", "content": body}]
    return [{"role": "user", "content": f"{frame.role}\n\n{body}"}]


def choose_operators(rng: np.random.Generator | random.Random, n: int, operators: Sequence[str]) -> list[str]:
    """``n`` names drawn uniformly, with replacement, from the (validated) ``operators``; reproducible from ``rng``."""
    names = validate_operators(operators)
    if n < 0:
        raise ValueError(f"cannot choose a negative number of operators ({n})")
    if isinstance(rng, np.random.Generator):
        return [names[int(i)] for i in rng.integers(0, len(names), size=n)]
    return [names[rng.randrange(len(names))] for _ in range(n)]
