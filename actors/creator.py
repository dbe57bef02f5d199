"""The creator: owns the seed set D, the prioritized generative buffer, the phase schedule and the evolver.

Per step the driver asks ``next_batch(step)`` for the minibatch the schedule plans (seeds from D in order, buffer
prompts drawn by informativeness) and later hands back the rewards with ``report(step, rewards)``. ``report``
measures each prompt's informativeness, pops the trained buffer entries, picks the most informative prompts as
parents and *starts* evolving them as an asyncio task, then returns at once: evolving never stalls training. The
children enter the buffer whenever the LLM answers. Only in bootstrap, when D is used up and the buffer cannot fill a
minibatch, does ``next_batch`` wait for in-flight evolve work, and then only for ``creator.bootstrap_wait_s``.

Every public method is a coroutine, so under Ray this is an async actor whose event loop also runs the evolve tasks,
and inline (tests, one machine) the driver runs it on an event loop of its own.

The evolver is the one ``evolve.method`` names (:mod:`eva_ray.evolve.methods`), called through the
:class:`~eva_ray.evolve.base.PromptEvolver` interface; methods that use an LLM reach it through LiteLLM
(:mod:`actors.evolve_llm`).

Children measured before they are drawn (``creator.child_scoring: probe``, as ACCEL does): landed children wait in
a probe queue instead of entering the buffer at their parent's score. Once per step the driver takes them
(:meth:`Creator.probe_requests`), generates ``creator.probe_responses`` rollouts of each with the current policy and
hands the rewards back (:meth:`Creator.report_probes`); a child enters the buffer at its measured informativeness,
or is dropped when its rollouts show no reward spread. Probe rollouts are counted with the trained ones
(``creator/rollouts_total``), so arms compare at equal rollouts. :func:`launch.probing.probe_children` is the
driver's side.

Nothing is lost: every prompt the creator handles is appended to ``lineage.jsonl`` in the run directory as it
happens (:mod:`eva_ray.lineage`), and :meth:`Creator.state_dict` / :meth:`Creator.load_state_dict` carry the whole
state (:class:`~actors.creator_state.CreatorState`: D's order and cursor, the buffer, the counters, every
generator, the evolve requests still in flight) into a resumed run that then draws exactly the batches the original
would have.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.creator_state import CreatorState, InFlight
from actors.evolve_llm import EvolveLLM, EvolveLLMError
from eva_ray.atomic import write_json
from eva_ray.buffer import GenerativeBuffer
from eva_ray.config import Config
from eva_ray.evolve.calls import LLMCaller
from eva_ray.evolve.evolver import CONFIG_CAUSES, Complete, EvolveBatch, EvolveCounts
from eva_ray.evolve.methods import build_evolver, make_validator
from eva_ray.informativeness import score_prompts
from eva_ray.lineage import LINEAGE_FILE, LineageLog
from eva_ray.metrics import histogram
from eva_ray.records import PromptRecord
from eva_ray.rewrite import Rewriter, RewriteCheck
from eva_ray.sampling import select_indices
from eva_ray.schedule import PHASES, BatchPlan, PhaseSettings, RunState, plan_batch

_TABLE_ROWS = 64  # evolved prompts kept for the wandb table
IN_FLIGHT_MODES = ("reissue", "lost")


class CreatorStarved(RuntimeError):
    """D is used up and the buffer cannot supply a single prompt: evolving has stopped producing children."""


@dataclass
class Batch:
    """One minibatch of prompts and how it was composed."""

    step: int
    phase: str
    prompts: list[PromptRecord]
    plan: BatchPlan
    from_buffer: list[bool]
    waited_s: float = 0.0


class Creator:
    """See the module docstring. ``complete`` replaces the LiteLLM binding (tests of other parts use it)."""

    def __init__(self, cfg: Config, seed_prompts: list[PromptRecord], *, run_dir: str | None = None,
                 complete: Complete | None = None) -> None:
        if not seed_prompts:
            raise ValueError("the creator needs a non-empty seed set D")
        self.cfg = cfg
        self.creator_cfg = cfg.creator
        self.settings = PhaseSettings.from_config(cfg.creator)
        self.run_dir = Path(run_dir) if run_dir else None
        self.rng = np.random.default_rng(cfg.run.seed)
        self.seeds = list(seed_prompts)
        self.seed_total = len(self.seeds) * cfg.creator.seed_epochs
        self.seed_used = 0
        self.buffer = GenerativeBuffer(cfg.creator.capacity, staleness_coef=cfg.creator.staleness_coef)
        self.warmed_up = False

        self.validator = make_validator(cfg)
        for record in self.seeds:  # an evolved prompt that repeats a seed prompt adds nothing
            self.validator.register(record.prompt_text)
        self.llm = EvolveLLM(cfg.evolve)
        self.lineage = LineageLog(self.run_dir / LINEAGE_FILE) if self.run_dir else None
        # None when nothing evolves (evolve.method=none, the static-D baseline): the buffer stays empty.
        self.evolver = build_evolver(cfg, self.validator, self.llm.connect if complete is None else lambda: complete)

        self._pending: dict[int, Batch] = {}
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: dict[int, InFlight] = {}
        self._next_flight = 0
        self.lost_requests = 0  # in flight at a checkpoint, not issued again on resume
        self.fatal: EvolveLLMError | None = None
        self.counts = EvolveCounts()
        self.add_counts: Counter = Counter()  # added / duplicate / evicted / popped in the buffer
        self.evolved_rows: deque = deque(maxlen=_TABLE_ROWS)
        self.task_errors: Counter = Counter()
        self.last_batch_info: dict[str, Any] = {}
        self.probing = cfg.creator.child_scoring == "probe"
        self._probe_queue: list[PromptRecord] = []  # landed children not yet measured (child_scoring=probe)
        # Rollouts by purpose, and what probing did with the children: the equal-rollout comparison needs both.
        self.probe_counts: Counter = Counter()
        self._complete = complete  # the test binding, used by the rewriter too
        self._rewriter: Rewriter | None = None  # opened on the first rewrite (offline.rewrite)
        self.rewrite_counts = EvolveCounts()  # every rewrite of the run, by outcome

    # ------------------------------------------------------------------------------------------------ next batch

    def _state(self, step: int) -> RunState:
        self.warmed_up = self.warmed_up or len(self.buffer) >= self.settings.capacity
        return RunState(step=step, buffer_size=len(self.buffer), seed_remaining=self.seed_total - self.seed_used,
                        warmed_up=self.warmed_up)

    def _take_seeds(self, n: int) -> list[PromptRecord]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.seed_used, len(self.seeds))
            if index == 0 and epoch > 0:  # a new pass over D, in a new (seeded) order
                self.seeds = [self.seeds[i] for i in self.rng.permutation(len(self.seeds))]
            out.append(self.seeds[index])
            self.seed_used += 1
        return out

    async def _wait_for_children(self, step: int, needed: int) -> float:
        """Bootstrap only: wait (bounded) until in-flight evolving brings the buffer to ``needed`` prompts."""
        start = time.monotonic()
        deadline = start + self.creator_cfg.bootstrap_wait_s
        while len(self.buffer) < needed and self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
        return time.monotonic() - start

    async def next_batch(self, step: int) -> Batch:
        """The minibatch for ``step`` as the schedule plans it."""
        if self.fatal is not None:
            raise self.fatal
        plan = plan_batch(self._state(step), self.settings)
        waited = 0.0
        if plan.short and plan.phase == "bootstrap":
            waited = await self._wait_for_children(step, self.settings.batch_size)
            plan = plan_batch(self._state(step), self.settings)
        if plan.size == 0:
            raise CreatorStarved(
                f"step {step}: D is used up and the buffer is empty after waiting {waited:.0f}s for evolved "
                f"prompts; evolve outcomes so far: {self.counts.to_dict() | {'latencies_s': '...'}}")
        seeds = self._take_seeds(plan.n_seed)
        drawn = self.buffer.sample(plan.n_buffer, mode=self.creator_cfg.sampling, rng=self.rng, step=step) \
            if plan.n_buffer else []
        batch = Batch(step=step, phase=plan.phase, prompts=seeds + list(drawn), plan=plan,
                      from_buffer=[False] * len(seeds) + [True] * len(drawn), waited_s=waited)
        self._pending[step] = batch
        return batch

    # ------------------------------------------------------------------------------------------------ report

    async def report(self, step: int, rewards: list[list[float]]) -> dict[str, Any]:
        """Rewards ``[P][N]`` for the prompts of ``next_batch(step)``, in that order. Starts evolving; returns at once."""
        batch = self._pending.pop(step, None)
        if batch is None:
            raise KeyError(f"report for step {step}, which has no outstanding batch")
        if len(rewards) != len(batch.prompts):
            raise ValueError(f"step {step}: {len(rewards)} reward rows for {len(batch.prompts)} prompts")
        info = score_prompts(rewards, self.creator_cfg.metric, inverse_eps=self.creator_cfg.inverse_eps)
        self.probe_counts["rollouts_trained"] += sum(len(row) for row in rewards)
        steer = self.cfg.evolve.method == "curriculum" and self.cfg.evolve.steer_by_success
        for record, score, row in zip(batch.prompts, info.scores, rewards):
            record.times_trained += 1
            if np.isfinite(score):
                record.info, record.info_measured = float(score), True
            if steer:  # the curriculum evolver steers a parent by how often the solver solved it
                finite = [float(r) for r in row if np.isfinite(r)]
                record.meta["success_rate"] = float(np.mean(finite)) if finite else None

        # Trained buffer entries always leave the buffer (the paper's "pop the trained ones"), so their scores are
        # kept on the records, which live on as parents and in the lineage, not written back into the buffer.
        buffer_ids = [r.id for r, b in zip(batch.prompts, batch.from_buffer) if b]
        if buffer_ids:
            self._forget(self.buffer.pop(buffer_ids), "popped")

        k = min(batch.plan.n_parents, len(batch.prompts))
        picked = select_indices(np.nan_to_num(info.scores, nan=0.0), k, mode=self.creator_cfg.parent_selection,
                                rng=self.rng)
        parents = [batch.prompts[i] for i in picked]
        if self.lineage is not None:
            self.lineage.write([
                {"event": "trained", "step": step, "id": r.id, "source": r.source, "parent_id": r.parent_id,
                 "generation": r.generation, "operator": r.operator, "info": float(score), "from_buffer": b}
                for r, score, b in zip(batch.prompts, info.scores, batch.from_buffer)])
        if self.evolver is not None:
            # An evolver that plans draws its requests now, so what is in flight is known exactly.
            jobs = self.evolver.plan(parents, batch.plan.n_children)
            self._start(InFlight(step, parents, batch.plan.n_children, jobs))

        finite = info.scores[np.isfinite(info.scores)]
        self.last_batch_info = {
            "phase": batch.phase, "evolved_fraction": float(np.mean([r.source == "evolved" for r in batch.prompts])),
            "from_buffer": len(buffer_ids), "from_seed": len(batch.prompts) - len(buffer_ids),
            "info_mean": float(finite.mean()) if finite.size else float("nan"),
            "informative_fraction": float((finite > 0).mean()) if finite.size else 0.0,
            "nonfinite_rewards": info.n_dropped, "parents": len(parents), "waited_s": batch.waited_s,
            "generations": [r.generation for r in batch.prompts],
            # The curriculum figure: at which difficulty the solver trained this step (worlds only).
            "difficulty": dict(Counter(str(r.meta["difficulty"]) for r in batch.prompts if "difficulty" in r.meta)),
        }
        return {"scores": [float(s) for s in info.scores], "parents": [p.id for p in parents]}

    def _start(self, flight: InFlight) -> None:
        key, self._next_flight = self._next_flight, self._next_flight + 1
        self._in_flight[key] = flight
        task = asyncio.create_task(self._evolve(flight, key))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _evolve(self, flight: InFlight, key: int) -> None:
        try:
            result = await self._run_flight(flight)
        finally:
            self._in_flight.pop(key, None)
        self._land(result, flight.step)

    async def _run_flight(self, flight: InFlight) -> EvolveBatch:
        if flight.jobs is not None:
            return await self.evolver.run_plan(flight.jobs, step=flight.step)
        return await self.evolver.evolve(flight.parents, flight.n_children, step=flight.step)

    def _land(self, result: EvolveBatch, step: int) -> None:
        """Count an evolve batch, put its children into the buffer and log where every request went."""
        self.counts.add(result.counts)
        self._check_usable(result)
        if self.lineage is not None:
            self.lineage.write([{"event": o.pop("outcome")} | o for o in (dict(o) for o in result.outcomes)])
        if self.probing:
            # Measured before they can be drawn: they wait for the driver's probe rollouts (report_probes).
            self._probe_queue.extend(result.children)
            return
        self._admit(result.children, step)

    def _admit(self, children: list[PromptRecord], step: int) -> None:
        """Put children into the buffer, oldest entries out to make room, and log it."""
        # Make room first, oldest out (the paper's "pop the oldest to keep size B"), so the evicted records' texts
        # can be released from the duplicate index.
        overflow = min(len(self.buffer), len(self.buffer) + len(children) - self.buffer.capacity)
        evicted = self.buffer.evict_oldest(overflow) if overflow > 0 else []
        self._forget(evicted, "evicted")
        added = self.buffer.add(children, step)
        by_id = {c.id: c for c in children}
        self.add_counts["added"] += len(added.added)
        self.add_counts["duplicate"] += len(added.rejected)
        # Refused as duplicates, or (only when one call brings more than the whole capacity) dropped at once.
        self._forget([by_id[i] for i in added.rejected + added.evicted], None)
        for child_id in added.added:
            child = by_id[child_id]
            self.evolved_rows.append([step, child.id, child.parent_id, child.operator, child.generation,
                                      child.info, child.prompt_text])
        if self.lineage is not None:
            events = [{"event": "evicted", "step": step, "id": r.id} for r in evicted]
            events += [{"event": "added", "step": step, "record": by_id[i].to_dict()} for i in added.added]
            events += [{"event": "duplicate", "step": step, "id": i} for i in added.rejected]
            events += [{"event": "evicted", "step": step, "id": i} for i in added.evicted]
            self.lineage.write(events)

    def _check_usable(self, result: EvolveBatch) -> None:
        """Stop the run, with the first error, when no evolve call ever worked and all failed for a config cause."""
        c = result.counts
        if self.fatal is not None or c.requested == 0 or self.counts.ok or self.counts.n_rejected:
            return
        if c.n_failed == c.requested and set(c.failed) <= CONFIG_CAUSES:
            first = next((o["error"] for o in result.outcomes if o.get("error")), "")
            self.fatal = EvolveLLMError(
                f"all {c.requested} evolve calls of the first batch failed ({dict(c.failed)}) and none has ever "
                f"worked: evolve.model {self.cfg.evolve.model!r} is misconfigured; first error: "
                f"{first.splitlines()[0] if first else '?'}")

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # An evolve task must never die silently: count it; stats() shows it.
            self.task_errors[type(task.exception()).__name__] += 1

    def _forget(self, records: list[PromptRecord], counter: str | None) -> None:
        """Records that left (or never entered) the buffer no longer block near-duplicates."""
        for record in records:
            self.validator.unregister(record.prompt_text)
        if counter:
            self.add_counts[counter] += len(records)

    # ------------------------------------------------------------------------------------------------ probing

    async def probe_requests(self) -> list[PromptRecord]:
        """The children waiting to be measured (child_scoring=probe), oldest first; [] otherwise.

        They stay queued until :meth:`report_probes` names them, so a probe lost to a crash is asked again.
        """
        if not self.probing:
            return []
        await asyncio.sleep(0)  # evolve tasks started by the last report (curriculum: no await inside) land first
        return list(self._probe_queue)

    async def report_probes(self, step: int, ids: list[str], rewards: list[list[float]]) -> dict[str, Any]:
        """Rewards ``[P][N]`` of probe rollouts for the queued children ``ids``: admit or drop each one.

        A child's measured informativeness (``creator.metric`` over its N rewards) replaces the parent's score it
        was born with. A child whose rewards have no spread (all solved or all failed) would give RLOO nothing, so
        it is dropped (``creator.probe_keep_flat`` keeps it at its measured score). A child whose rewards were all
        invalid was not measured: it keeps its inherited score and is admitted.
        """
        if len(ids) != len(rewards):
            raise ValueError(f"report_probes: {len(rewards)} reward rows for {len(ids)} children")
        queued = {c.id: c for c in self._probe_queue}
        unknown = [i for i in ids if i not in queued]
        if unknown:
            raise KeyError(f"report_probes: {unknown[:3]} are not waiting to be probed")
        info = score_prompts(rewards, self.creator_cfg.metric, inverse_eps=self.creator_cfg.inverse_eps)
        admitted, dropped, unmeasured = [], [], 0
        scores = {}
        for child_id, row, score in zip(ids, rewards, info.scores):
            child = queued[child_id]
            finite = [r for r in row if np.isfinite(r)]
            if not finite:
                unmeasured += 1
                admitted.append(child)
                continue
            child.info, child.info_measured = float(score), True
            scores[child_id] = float(score)
            # Spread, not the metric, decides: the inverse metrics score a flat child highest.
            (admitted if max(finite) > min(finite) or self.creator_cfg.probe_keep_flat else dropped).append(child)
        done = set(ids)
        self._probe_queue = [c for c in self._probe_queue if c.id not in done]
        self._forget(dropped, None)
        n_rollouts = sum(len(row) for row in rewards)
        self.probe_counts.update({"rollouts_probe": n_rollouts, "probed": len(ids), "admitted": len(admitted),
                                  "dropped": len(dropped), "unmeasured": unmeasured})
        if self.lineage is not None:
            dropped_ids = {c.id for c in dropped}
            self.lineage.write([{"event": "probed", "step": step, "id": i, "info": scores.get(i),
                                 "kept": i not in dropped_ids} for i in ids])
        self._admit(admitted, step)
        return {"probed": len(ids), "admitted": len(admitted), "dropped": len(dropped), "unmeasured": unmeasured,
                "probe_rollouts": n_rollouts, "scores": scores}

    # ------------------------------------------------------------------------------------------------ rewrite

    async def rewrite(self, prompts: list[PromptRecord], responses: list[str]) -> dict[str, Any]:
        """Offline eva's rewriter (``offline.rewrite``): the evolve LLM improves ``responses[i]``, the chosen
        response to ``prompts[i]``, for every i (:mod:`eva_ray.rewrite`).

        Returns ``{"texts": [str | None per pair], "counts": {"requested", "ok", "rejected": {reason: n},
        "failed": {cause: n}, "retried": {cause: n}}}``; a None text (dropped or failed) means: keep the original.
        Requests run concurrently, at most ``evolve.concurrency`` at once, each under the evolve calls' timeout
        and retry policy; nothing the LLM does raises.
        """
        if self._rewriter is None:
            complete = self._complete or self.llm.connect(max_tokens=self.cfg.offline.rewrite_max_tokens)
            self._rewriter = Rewriter(LLMCaller.from_config(complete, self.cfg.evolve),
                                      RewriteCheck.from_config(self.cfg.offline),
                                      system_message=self.cfg.evolve.system_message)
        result = await self._rewriter.rewrite([p.prompt_text for p in prompts], list(responses))
        self.rewrite_counts.add(result.counts)
        return result.to_dict()

    # ------------------------------------------------------------------------------------------------ metrics & end

    async def stats(self) -> dict[str, Any]:
        """``buffer/`` and ``creator/`` metrics for the step just reported."""
        b = self.buffer.stats()
        lat = np.asarray(self.counts.latencies_s, dtype=float)
        batch = self.last_batch_info
        buffer_metrics = {
            "size": b["size"], "capacity": b["capacity"], "phase": PHASES.index(batch.get("phase", "warm-up")),
            "evolved_fraction": batch.get("evolved_fraction", 0.0), "generations": dict(b["generations"]),
            "operators": dict(b["operators"]), "measured_fraction": b["measured_fraction"],
            "info_hist": histogram(self.buffer.info_values()),
            "generation_hist": histogram(self.buffer.generation_values(), integer=True),
            "seed_used": self.seed_used, "seed_total": self.seed_total,
            "batch_difficulty": batch.get("difficulty", {}),
        }
        creator_metrics = {
            "evolve_requested": self.counts.requested, "evolve_ok": self.counts.ok,
            "evolve_rejected": dict(self.counts.rejected), "evolve_failed": dict(self.counts.failed),
            "evolve_rejected_total": self.counts.n_rejected, "evolve_failed_total": self.counts.n_failed,
            "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else 0.0,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else 0.0,
            "in_flight": len(self._tasks), "llm_calls": self.llm.counters["calls"],
            "llm_retries": self.counts.n_retried, "llm_retried": dict(self.counts.retried),
            "evolve_lost": self.lost_requests, "task_errors": dict(self.task_errors),
            "buffer_added": self.add_counts["added"], "buffer_evicted": self.add_counts["evicted"],
            "buffer_popped": self.add_counts["popped"],
            "batch_info_mean": batch.get("info_mean", float("nan")),
            "batch_informative_fraction": batch.get("informative_fraction", 0.0),
            "batch_waited_s": batch.get("waited_s", 0.0),
            # Every rollout the run generated, trained on or spent measuring children (child_scoring=probe).
            "rollouts_trained": self.probe_counts["rollouts_trained"],
            "rollouts_probe": self.probe_counts["rollouts_probe"],
            "rollouts_total": self.probe_counts["rollouts_trained"] + self.probe_counts["rollouts_probe"],
        }
        if self.probing:
            creator_metrics.update({f"probe_{k}": self.probe_counts[k] for k in
                                    ("probed", "admitted", "dropped", "unmeasured")},
                                   probe_queue=len(self._probe_queue))
        return {"buffer": buffer_metrics, "creator": creator_metrics,
                "phase_name": batch.get("phase", "warm-up"), "batch": batch}

    async def evolve_set(self, parents: list[PromptRecord], n_children: int, step: int) -> dict[str, Any]:
        """Offline eva's evolve step: up to ``n_children`` children of every parent, returned, not buffered.

        The offline loop forms the next prompt set itself; the creator lends it its evolver, its duplicate index
        (children repeat no seed, no earlier child and no sibling), its counts and its lineage log. Returns
        ``{"children": [record dicts], "counts": EvolveCounts.to_dict()}``; raises ``EvolveLLMError`` when every
        call failed for a configuration cause, as the online creator stops then.
        """
        if self.evolver is None:
            raise RuntimeError(f"evolve.method {self.cfg.evolve.method!r} evolves nothing; offline eva needs one")
        # Seeded by the iteration, not by what ran before in this process: a resumed run evolves as the
        # uninterrupted one would (with remember() given the texts the earlier iterations made).
        self.evolver.rng = np.random.default_rng([self.cfg.run.seed, step])
        jobs = self.evolver.plan(parents, n_children)
        result = await (self.evolver.run_plan(jobs, step=step) if jobs is not None
                        else self.evolver.evolve(parents, n_children, step=step))
        self.counts.add(result.counts)
        self._check_usable(result)
        if self.fatal is not None:
            raise self.fatal
        if self.lineage is not None:
            self.lineage.write([{"event": o.pop("outcome")} | o for o in (dict(o) for o in result.outcomes)])
        return {"children": [c.to_dict() for c in result.children], "counts": result.counts.to_dict()}

    async def remember(self, texts: list[str]) -> int:
        """Register prompts made before this process started (a resumed offline run's earlier children) in the
        duplicate index, so no later child repeats them; returns how many."""
        for text in texts:
            self.validator.register(text)
        return len(texts)

    async def evolved_table(self) -> list[list[Any]]:
        """Recent evolved prompts: step, id, parent id, operator, generation, informativeness, text."""
        return [list(row) for row in self.evolved_rows]

    async def drain(self, timeout_s: float = 60.0) -> int:
        """Wait for in-flight evolve tasks (at the end of a run); returns how many were still running after."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return len(self._tasks)

    async def snapshot(self, path: str) -> str:
        self.buffer.snapshot(path)
        return path

    # ------------------------------------------------------------------------------------------------ state

    async def state_dict(self) -> dict[str, Any]:
        """The creator's whole state, JSON-serialisable: what :meth:`load_state_dict` needs to go on exactly.

        Taken between steps (after ``report``, before the next ``next_batch``). Evolve work still in flight is
        recorded with its parents (and its planned requests), to be issued again or counted as lost on load.
        """
        if self._pending:
            raise RuntimeError(f"the batches of steps {sorted(self._pending)} are out and not reported; save the "
                               "creator between steps")
        return CreatorState(
            seeds=self.seeds, seed_used=self.seed_used, warmed_up=self.warmed_up, buffer=self.buffer,
            rng=self.rng.bit_generator.state,
            evolver=None if self.evolver is None else self.evolver.state_dict(),
            counts=self.counts, add_counts=self.add_counts, task_errors=self.task_errors,
            llm_counters=self.llm.counters, validator_rejections=self.validator.rejections,
            validator_accepted=self.validator.accepted, evolved_rows=list(self.evolved_rows),
            last_batch_info=self.last_batch_info, lost_requests=self.lost_requests,
            in_flight=[flight for _, flight in sorted(self._in_flight.items())],
            lineage_offset=None if self.lineage is None else self.lineage.offset(),
            probe_queue=self._probe_queue, probe_counts=self.probe_counts,
        ).to_dict()

    async def load_state_dict(self, state: dict[str, Any], *, in_flight: str = "reissue") -> dict[str, int]:
        """Continue from :meth:`state_dict` (into a creator just built with the same config and seed set).

        ``in_flight``: ``reissue`` starts the recorded evolve work again (an evolver that plans repeats the same
        requests), ``lost`` counts its requests in ``creator/evolve_lost`` and the lineage. The lineage log is cut
        back to the checkpoint, so steps made again are not logged twice. Returns how many requests were reissued
        and lost.
        """
        saved = CreatorState.from_dict(state)
        if in_flight not in IN_FLIGHT_MODES:
            raise ValueError(f"in_flight {in_flight!r} is not one of {IN_FLIGHT_MODES}")
        if self._tasks or self._pending or self.seed_used:
            raise RuntimeError("load_state_dict needs a fresh creator (no step taken, nothing in flight)")
        if sorted((r.id, r.prompt_text) for r in saved.seeds) != sorted((r.id, r.prompt_text) for r in self.seeds):
            raise ValueError("the saved seed set differs from this creator's D: resume with the run's own data")
        if (saved.evolver is None) != (self.evolver is None):
            raise ValueError("the saved creator and this one differ in evolve.method")
        self.seeds, self.seed_used, self.warmed_up = saved.seeds, saved.seed_used, saved.warmed_up
        self.buffer = saved.buffer
        self._probe_queue, self.probe_counts = saved.probe_queue, saved.probe_counts
        for record in [*self.buffer.records(), *self._probe_queue]:  # seeds are registered already, by the constructor
            self.validator.register(record.prompt_text)
        self.validator.rejections, self.validator.accepted = saved.validator_rejections, saved.validator_accepted
        self.rng.bit_generator.state = saved.rng
        if self.evolver is not None:
            self.evolver.load_state_dict(saved.evolver)
        self.counts = saved.counts
        self.add_counts, self.task_errors = saved.add_counts, saved.task_errors
        self.llm.counters.update(saved.llm_counters)
        self.evolved_rows.extend(tuple(row) for row in saved.evolved_rows)
        self.last_batch_info = saved.last_batch_info
        self.lost_requests = saved.lost_requests
        events: list[dict[str, Any]] = [{"event": "resumed", "step": None, "in_flight": in_flight}]
        done = Counter()
        for flight in saved.in_flight:
            if in_flight == "reissue":
                self._start(flight)
                done["reissued"] += flight.n_requests
            else:
                self.lost_requests += flight.n_requests
                done["lost"] += flight.n_requests
                events.append({"event": "lost", "step": flight.step, "requests": flight.n_requests,
                               "parent_ids": [p.id for p in flight.parents]})
        if self.lineage is not None:
            if saved.lineage_offset is not None:
                self.lineage.truncate(saved.lineage_offset)
            self.lineage.write(events)
        return {"reissued": done["reissued"], "lost": done["lost"]}

    async def save(self, path: str) -> str:
        """Write :meth:`state_dict` to ``path`` as JSON, atomically (a crash mid-write keeps the previous file)."""
        write_json(path, await self.state_dict())
        return path

    async def load(self, path: str, *, in_flight: str = "reissue") -> dict[str, int]:
        """:meth:`load_state_dict` from a file written by :meth:`save`."""
        return await self.load_state_dict(json.loads(Path(path).read_text(encoding="utf-8")), in_flight=in_flight)

    async def buffer_records(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.buffer.records()]

    async def provider_stats(self) -> dict[str, Any]:
        """The local provider's counters since this creator started ({} when evolving uses a remote API)."""
        return self.llm.provider_stats()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lineage is not None:
            self.lineage.close()
        self.llm.close()
