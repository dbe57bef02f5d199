"""The creator's checkpoint as one typed object, and the evolve work in flight that it records.

:class:`CreatorState` is everything a resumed creator needs to draw exactly the batches the original would have;
``to_dict`` / ``from_dict`` give the JSON of ``creator.json`` (format ``eva-ray/creator-state``, version 1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from eva_ray.buffer import GenerativeBuffer
from eva_ray.evolve.evolver import EvolveCounts, EvolveJob
from eva_ray.records import PromptRecord

STATE_FORMAT = "eva-ray/creator-state"
STATE_VERSION = 1


@dataclass
class InFlight:
    """Evolve work started by a report and not finished: enough to issue it again after a restart.

    ``jobs`` are the requests as the evolver planned them (``PromptEvolver.plan``: the plain LLM evolver draws its
    operators before it calls, so issuing them again repeats exactly what was asked); ``None`` when the work draws
    as it runs (the curriculum, whose work has not started while it is in flight, and tree best-of-N, which draws
    per level).
    """

    step: int
    parents: list[PromptRecord]
    n_children: int
    jobs: list[EvolveJob] | None = None

    @property
    def n_requests(self) -> int:
        return len(self.jobs) if self.jobs is not None else len(self.parents) * self.n_children

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "parents": [p.to_dict() for p in self.parents], "n_children": self.n_children,
                "jobs": None if self.jobs is None else
                [{"parent_id": j.parent.id, "operator": j.operator, "index": j.index} for j in self.jobs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], known: dict[str, PromptRecord]) -> InFlight:
        """``known``: records to use for parents with these ids (the seeds), so they stay one object."""
        parents = [known.get(row["id"]) or PromptRecord.from_dict(row) for row in data["parents"]]
        by_id = {p.id: p for p in parents}
        jobs = None if data["jobs"] is None else \
            [EvolveJob(by_id[j["parent_id"]], j["operator"], j["index"]) for j in data["jobs"]]
        return cls(step=data["step"], parents=parents, n_children=data["n_children"], jobs=jobs)


@dataclass
class CreatorState:
    """The creator between two steps (after ``report``, before the next ``next_batch``)."""

    seeds: list[PromptRecord]
    """D in its current pass's order."""
    seed_used: int
    """Seeds handed out so far, over all passes over D."""
    warmed_up: bool
    buffer: GenerativeBuffer
    rng: dict[str, Any]
    """The creator's generator (seed order, buffer sampling, parent selection)."""
    evolver: Any
    """``PromptEvolver.state_dict()``; ``None`` when nothing evolves (``evolve.method=none``)."""
    counts: EvolveCounts
    add_counts: Counter
    task_errors: Counter
    llm_counters: Counter
    validator_rejections: Counter
    validator_accepted: int
    evolved_rows: list[list[Any]]
    last_batch_info: dict[str, Any]
    lost_requests: int
    in_flight: list[InFlight]
    lineage_offset: int | None
    probe_queue: list[PromptRecord] = field(default_factory=list)
    probe_counts: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "seeds": [r.to_dict() for r in self.seeds], "seed_used": self.seed_used, "warmed_up": self.warmed_up,
            "buffer": {"capacity": self.buffer.capacity, "staleness_coef": self.buffer.staleness_coef,
                       "records": [r.to_dict() for r in self.buffer.records()]},
            "rng": self.rng, "evolver_rng": self.evolver,
            "counts": self.counts.to_dict(), "add_counts": dict(self.add_counts),
            "task_errors": dict(self.task_errors), "llm_counters": dict(self.llm_counters),
            "validator": {"rejections": dict(self.validator_rejections), "accepted": self.validator_accepted},
            "evolved_rows": [list(row) for row in self.evolved_rows], "last_batch_info": self.last_batch_info,
            "lost_requests": self.lost_requests,
            "in_flight": [flight.to_dict() for flight in self.in_flight],
            "lineage_offset": self.lineage_offset,
            "probe_queue": [r.to_dict() for r in self.probe_queue], "probe_counts": dict(self.probe_counts),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CreatorState:
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a creator state of version {STATE_VERSION} (format {state.get('format')!r}, "
                             f"version {state.get('version')!r})")
        seeds = [PromptRecord.from_dict(row) for row in state["seeds"]]
        seeds_by_id = {r.id: r for r in seeds}
        b = state["buffer"]
        return cls(
            seeds=seeds, seed_used=state["seed_used"], warmed_up=state["warmed_up"],
            buffer=GenerativeBuffer.from_records(b["capacity"], [PromptRecord.from_dict(r) for r in b["records"]],
                                                 staleness_coef=b["staleness_coef"]),
            rng=state["rng"], evolver=state["evolver_rng"], counts=EvolveCounts.from_dict(state["counts"]),
            add_counts=Counter(state["add_counts"]), task_errors=Counter(state["task_errors"]),
            llm_counters=Counter(state["llm_counters"]),
            validator_rejections=Counter(state["validator"]["rejections"]),
            validator_accepted=state["validator"]["accepted"],
            evolved_rows=[list(row) for row in state["evolved_rows"]], last_batch_info=state["last_batch_info"],
            lost_requests=state["lost_requests"],
            in_flight=[InFlight.from_dict(row, seeds_by_id) for row in state["in_flight"]],
            lineage_offset=state["lineage_offset"],
            # States written before probing existed have neither key.
            probe_queue=[PromptRecord.from_dict(r) for r in state.get("probe_queue", [])],
            probe_counts=Counter(state.get("probe_counts", {})),
        )
