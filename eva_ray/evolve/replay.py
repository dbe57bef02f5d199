"""The replay method (``evolve.method: replay``): nothing is evolved; each parent re-enters the buffer as itself.

The paper's "evolving vs not" ablation asks what the generative part of the buffer adds over prioritised replay of
the prompts the creator already found informative. Here the buffer holds copies of the batch's top parents (new ids,
the parent's text and meta, ``operator: replay``), drawn again by informativeness like any buffer entry. One copy
per parent and step, whatever ``n_children`` says: more copies of the same text would add nothing but weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eva_ray.evolve.base import PromptEvolver
from eva_ray.evolve.evolver import EvolveBatch, EvolveCounts
from eva_ray.records import PromptRecord, make_child


class ReplayEvolver(PromptEvolver):
    def __init__(self, rng_seed: int = 0) -> None:
        self.rng = np.random.default_rng(rng_seed)  # unused: replay draws nothing; kept for the checkpoint format

    async def evolve(self, parents: Sequence[PromptRecord], n_children: int, *, step: int) -> EvolveBatch:
        children = [make_child(p, p.prompt_text, operator="replay", step=step, index=0,
                               meta={k: v for k, v in (p.meta or {}).items() if k != "success_rate"})
                    for p in parents] if n_children > 0 else []
        counts = EvolveCounts(requested=len(children))
        counts.ok = len(children)
        return EvolveBatch(children=children, counts=counts, outcomes=[])
