"""Evolving prompts: the evolver interface and its methods, operators and meta-prompt styles, parsing/validation of
the answers.

:mod:`eva_ray.evolve.base` is the interface the creator calls (:class:`PromptEvolver`), and
:mod:`eva_ray.evolve.methods` the registry of ``evolve.method`` values that builds one. The LLM is injected as an
async ``complete(messages) -> str`` callable, so this package needs neither Ray nor LiteLLM; the creator actor binds
a provider to it.
"""

from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.evolver import Complete, EvolveBatch, EvolveCounts, Evolver, Scorer, TreeBoNEvolver
from eva_ray.evolve.operators import (
    IN_BREADTH,
    IN_DEPTH,
    INPUT_MARKER,
    OPERATORS,
    OUTPUT_MARKER,
    STYLES,
    Operator,
    Style,
    build_messages,
    choose_operators,
)
from eva_ray.evolve.validate import (
    REJECTION_REASONS,
    EvolveValidator,
    NearDuplicateIndex,
    RejectionCounter,
    normalize,
    parse_evolved,
)

__all__ = [
    "Complete",
    "EvolveBatch",
    "EvolveCounts",
    "EvolveValidator",
    "Evolver",
    "IN_BREADTH",
    "IN_DEPTH",
    "INPUT_MARKER",
    "NearDuplicateIndex",
    "OPERATORS",
    "OUTPUT_MARKER",
    "Operator",
    "PromptEvolver",
    "REJECTION_REASONS",
    "RejectionCounter",
    "STYLES",
    "Scorer",
    "Style",
    "TreeBoNEvolver",
    "build_messages",
    "choose_operators",
    "normalize",
    "parse_evolved",
]
