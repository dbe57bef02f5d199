"""The prioritized generative buffer of online eva (arXiv 2411.00062, section 3.3.2).

Evolved prompts wait here until the solver trains on them. Like prioritized experience replay (Schaul et al., 2015)
the buffer is sampled in proportion to a priority, here the prompt's informativeness; an optional staleness term, as
in Prioritized Level Replay (Jiang et al., 2021), mixes in prompts that have not been sampled for a long time:

    P(i) = (1 - rho) * P_score(i) + rho * P_stale(i),
    P_score(i) ~ info_i,   P_stale(i) ~ step - last_sampled_step_i   (never sampled: step - step_born_i)

The buffer holds at most ``capacity`` prompts and evicts the oldest first. How the driver uses it per step (paper
appendix A): in warm-up it only adds evolved children; in mix-up and bootstrap it samples part or all of the
minibatch, reports the measured scores (:meth:`GenerativeBuffer.update_scores`), pops the entries it trained on
(:meth:`GenerativeBuffer.pop`) and adds the children, which evicts the oldest entries to keep the size at B.

Speed: priorities and staleness references are mirrored in numpy arrays kept in insertion order, so sampling from a
100,000-prompt buffer costs a few vectorised passes and no per-prompt Python. Removed entries leave a tombstone that
a compaction clears once the arrays fill up (amortised O(1) per insertion). Because of the mirror, change a held
record's ``info``, ``info_measured`` and ``last_sampled_step`` only through the buffer's methods
(:meth:`~GenerativeBuffer.update_scores`, :meth:`~GenerativeBuffer.sample`); a caller that sets them on the record
first must still report them through ``update_scores``.

Usage::

    buf = GenerativeBuffer(3200, staleness_coef=0.1)
    buf.add(children, step=step)
    batch = buf.sample(4, mode="sample", rng=rng, step=step)
    buf.update_scores([r.id for r in batch], scores)
    buf.pop([r.id for r in batch])
    buf.snapshot("run/buffer.json"); buf = GenerativeBuffer.restore("run/buffer.json")
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from eva_ray.atomic import write_text
from eva_ray.records import PromptRecord
from eva_ray.sampling import clean_weights, select_indices

SNAPSHOT_FORMAT = "eva-ray/generative-buffer"
SNAPSHOT_VERSION = 1
INFO_QUANTILES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
_MIN_SLOTS = 64


class SnapshotError(ValueError):
    """A buffer snapshot file that cannot be read: not JSON, not a buffer snapshot, or an unsupported version."""


@dataclass(frozen=True)
class AddResult:
    """What :meth:`GenerativeBuffer.add` did.

    Attributes:
        added: ids now held by the buffer, in the order given.
        rejected: ids refused as duplicates (already held, or repeated within the call).
        evicted: ids removed to stay within capacity, oldest first. When one call brings more new records than the
            whole capacity, its own earliest records are dropped too and are listed here, not in ``added``.
    """

    added: tuple[str, ...]
    rejected: tuple[str, ...]
    evicted: tuple[str, ...]


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`GenerativeBuffer.update_scores` did: how many scores it set, how many non-finite scores left the
    prior in place, and which ids it does not hold (popped or evicted meanwhile)."""

    updated: int
    kept_prior: int
    unknown: tuple[str, ...]


class GenerativeBuffer:
    """A capacity-bounded, insertion-ordered set of :class:`PromptRecord`, sampled by informativeness."""

    def __init__(self, capacity: int, *, staleness_coef: float = 0.0) -> None:
        """
        Args:
            capacity: the most records held (the paper's B, 3200 online); adding beyond it evicts the oldest.
            staleness_coef: rho in [0, 1], the weight of the staleness distribution in the sampling mixture.
                0 (the paper) samples by informativeness alone.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not 0.0 <= staleness_coef <= 1.0:
            raise ValueError(f"staleness_coef must be in [0, 1], got {staleness_coef!r}")
        self.capacity = capacity
        self.staleness_coef = float(staleness_coef)
        # Every record gets a sequence number at insertion that never changes, and the id -> seq dict is the only
        # per-record Python index. Records live in slots, parallel numpy arrays in insertion (= seq) order; slots in
        # [_head, _end) may be live, dead ones are tombstones. Because _seq is sorted, an id's slot is a binary
        # search away, so compaction only moves numpy arrays and never rebuilds a Python dict of 100k entries.
        self._seq_of: dict[str, int] = {}
        self._next_seq = 0
        n_slots = min(_MIN_SLOTS, 2 * capacity)
        self._seq = np.zeros(n_slots, dtype=np.int64)
        self._recs = np.full(n_slots, None, dtype=object)
        self._info = np.full(n_slots, np.nan)  # NaN mirrors info=None
        self._stale_ref = np.zeros(n_slots, dtype=np.int64)  # last_sampled_step, or step_born if never sampled
        self._measured = np.zeros(n_slots, dtype=bool)  # info_measured, as the buffer last set or saw it
        self._alive = np.zeros(n_slots, dtype=bool)
        self._head = 0
        self._end = 0
        # Running counts so stats() needs no pass over the records (generation and operator never change).
        self._generations: Counter[int] = Counter()
        self._operators: Counter[str] = Counter()
        # The latest step any held-or-removed record was born or sampled at; sampling before it means the driver's
        # step went backwards, which would make staleness negative.
        self._max_ref = 0

    # ------------------------------------------------------------------ container protocol

    def __len__(self) -> int:
        return len(self._seq_of)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._seq_of

    def get(self, prompt_id: str) -> PromptRecord | None:
        """The held record with this id, or None."""
        if prompt_id not in self._seq_of:
            return None
        return self._recs[self._slots_of([prompt_id])[0]]

    def records(self) -> Iterator[PromptRecord]:
        """The held records, oldest first."""
        return iter(self._recs[self._live_slots()].tolist())

    def ids(self) -> list[str]:
        """The held ids, oldest first."""
        return list(self._seq_of)

    def texts(self) -> list[str]:
        """The prompt texts (``PromptRecord.prompt_text``), oldest first, for near-duplicate checks on new prompts."""
        return [rec.prompt_text for rec in self.records()]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GenerativeBuffer):
            return NotImplemented
        return (
            self.capacity == other.capacity
            and self.staleness_coef == other.staleness_coef
            and list(self.records()) == list(other.records())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def __repr__(self) -> str:
        return f"GenerativeBuffer(size={len(self)}, capacity={self.capacity}, staleness_coef={self.staleness_coef})"

    # ------------------------------------------------------------------ adding and removing

    def add(self, records: Iterable[PromptRecord], step: int) -> AddResult:
        """Add records (typically evolved children) at learner step ``step``, evicting the oldest beyond capacity.

        A child's ``info`` is its parent's until the child is measured (``make_child`` sets that up). A non-finite
        ``info`` (a parent whose rewards were all invalid) is reset to None: no prior, priority 0, still samplable.
        The records are validated before anything changes, so a bad record leaves the buffer as it was.

        Raises:
            TypeError: an element is not a PromptRecord, or its info is not a number.
            ValueError: a record was born or last sampled after ``step`` (its staleness would be negative).
        """
        records = list(records)
        for rec in records:
            if not isinstance(rec, PromptRecord):
                raise TypeError(f"GenerativeBuffer.add takes PromptRecord, got {type(rec).__name__}")
            if rec.info is not None and not isinstance(rec.info, numbers.Real):
                raise TypeError(f"prompt {rec.id!r}: info must be a real number or None, got {rec.info!r}")
            if _stale_ref(rec) > step:
                raise ValueError(f"prompt {rec.id!r} was born or sampled after the add step {step}")
        accepted: list[PromptRecord] = []
        rejected: list[str] = []
        seen: set[str] = set()
        for rec in records:
            if rec.id in self._seq_of or rec.id in seen:
                rejected.append(rec.id)
            else:
                seen.add(rec.id)
                accepted.append(rec)
        # Only the newest `capacity` of this call can stay; the rest would be evicted the moment they arrive.
        n_dropped_new = max(0, len(accepted) - self.capacity)
        dropped_new, accepted = accepted[:n_dropped_new], accepted[n_dropped_new:]
        evicted = self.evict_oldest(max(0, len(self) + len(accepted) - self.capacity))
        self._append(accepted)
        return AddResult(
            added=tuple(rec.id for rec in accepted),
            rejected=tuple(rejected),
            evicted=tuple(rec.id for rec in evicted) + tuple(rec.id for rec in dropped_new),
        )

    def pop(self, ids: Iterable[str]) -> list[PromptRecord]:
        """Remove the records with these ids (e.g. the ones just trained on) and return them; skip unknown ids."""
        return self._remove(self._slots_of([i for i in dict.fromkeys(ids) if i in self._seq_of]))

    def evict_oldest(self, n: int) -> list[PromptRecord]:
        """Remove and return the ``n`` oldest records, oldest first.

        Raises:
            ValueError: ``n`` is negative or more than the buffer holds.
        """
        if n < 0 or n > len(self):
            raise ValueError(f"cannot evict {n} records from a buffer of {len(self)}")
        if n == 0:
            return []
        slots = self._head + np.flatnonzero(self._alive[self._head : self._end])[:n]
        removed = self._remove(slots)
        self._head = int(slots[-1]) + 1  # every slot before the last evicted one is now dead
        return removed

    # ------------------------------------------------------------------ priorities

    def update_scores(self, ids: Sequence[str], scores: ArrayLike) -> UpdateResult:
        """Set measured informativeness ``scores [m]`` for ``ids [m]``.

        A finite score replaces ``info`` and marks it measured. A NaN (or inf) score, i.e. a prompt whose rewards were
        all invalid, keeps the previous value: one failed reward call should not erase what was known. Ids the buffer
        no longer holds are ignored and reported.
        """
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        if values.size != len(ids):
            raise ValueError(f"update_scores got {len(ids)} ids but {values.size} scores")
        known = np.array([i in self._seq_of for i in ids], dtype=bool)
        usable = known & np.isfinite(values)
        slots = self._slots_of([i for i, ok in zip(ids, usable.tolist()) if ok])
        self._info[slots] = values[usable]
        self._measured[slots] = True
        for rec, value in zip(self._recs[slots].tolist(), values[usable].tolist()):
            rec.info, rec.info_measured = value, True
        return UpdateResult(
            updated=int(usable.sum()),
            kept_prior=int((known & ~usable).sum()),
            unknown=tuple(i for i, ok in zip(ids, known.tolist()) if not ok),
        )

    def mark_trained(self, ids: Iterable[str]) -> int:
        """Count one more training use for each held id; returns how many were held (unknown ids are ignored)."""
        held = [i for i in ids if i in self._seq_of]
        for rec in self._recs[self._slots_of(held)].tolist():
            rec.times_trained += 1
        return len(held)

    def sample(
        self, k: int, *, mode: str = "sample", rng: np.random.Generator, step: int
    ) -> list[PromptRecord]:
        """Draw ``k`` distinct records by priority at learner step ``step`` and stamp their ``last_sampled_step``.

        Priority is ``info``; a record without info, or with a negative one, has priority 0 and is drawn only when
        too few records have a positive priority (see :func:`eva_ray.sampling.select_indices`). With
        ``staleness_coef`` rho > 0 the two distributions are mixed into one weight vector before drawing.

        Returns:
            ``k`` records in draw order (``greedy``: by decreasing priority).

        Raises:
            ValueError: ``k`` exceeds the size, or ``step`` is earlier than a step the buffer has already seen
                (a record's birth or last sample): steps must not go backwards.
        """
        slots = self._live_slots()
        probs = self._probabilities(slots, step)
        chosen = slots[select_indices(probs, k, mode=mode, rng=rng)]
        self._stale_ref[chosen] = step
        self._max_ref = step  # _probabilities checked step >= _max_ref
        batch: list[PromptRecord] = self._recs[chosen].tolist()
        for rec in batch:
            rec.last_sampled_step = step
        return batch

    def sampling_probs(self, step: int) -> np.ndarray:
        """``[size]`` float64, oldest first: the probability that each held record is drawn first at ``step``.

        ``(1 - rho) * P_score + rho * P_stale``; a part whose weights are all 0 is uniform (nothing to prefer).
        """
        return self._probabilities(self._live_slots(), step)

    def _probabilities(self, slots: np.ndarray, step: int) -> np.ndarray:
        if step < self._max_ref:
            raise ValueError(f"step {step} is earlier than step {self._max_ref} already seen by the buffer")
        probs = _normalise(clean_weights(self._info[slots]))
        if self.staleness_coef > 0:
            rho = self.staleness_coef
            staleness = (step - self._stale_ref[slots]).astype(np.float64)
            probs = (1.0 - rho) * probs + rho * _normalise(staleness)
        return probs

    # ------------------------------------------------------------------ reporting

    def info_values(self) -> np.ndarray:
        """``[n]`` float64 informativeness of the held records that have one, oldest first (for histograms; no
        Python pass over the records)."""
        values = self._info[self._live_slots()]
        return values[np.isfinite(values)]

    def generation_values(self) -> np.ndarray:
        """``[size]`` int64 generation of every held record, expanded from the running counts (no record pass)."""
        gens = sorted(self._generations.items())
        return np.repeat(np.array([g for g, _ in gens], dtype=np.int64), [n for _, n in gens])

    def stats(self) -> dict[str, Any]:
        """Summary for logging: size, capacity, ``generations`` {generation: count}, ``operators`` {operator: count}
        (seeds count under ``"none"``), ``info_quantiles`` {"p0", "p25", "p50", "p75", "p100"} over the records that
        have an info (None values when none has), ``n_with_info`` and ``measured_fraction``."""
        live = self._live_slots()
        info = self._info[live]
        info = info[~np.isnan(info)]
        names = [f"p{round(q * 100)}" for q in INFO_QUANTILES]
        values = np.quantile(info, INFO_QUANTILES).tolist() if info.size else [None] * len(names)
        return {
            "size": len(self),
            "capacity": self.capacity,
            "generations": dict(sorted(self._generations.items())),
            "operators": dict(sorted(self._operators.items())),
            "info_quantiles": dict(zip(names, values)),
            "n_with_info": int(info.size),
            "measured_fraction": float(self._measured[live].mean()) if live.size else 0.0,
        }

    # ------------------------------------------------------------------ persistence

    def snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write the whole buffer (settings and records, oldest first) to ``path`` as JSON, atomically.

        The file is written next to ``path``, flushed to disk and then renamed over it, so a crash mid-write leaves
        the previous snapshot intact rather than a truncated one.
        """
        payload = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "capacity": self.capacity,
            "staleness_coef": self.staleness_coef,
            "records": [rec.to_dict() for rec in self.records()],
        }
        try:
            text = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"buffer snapshot {path}: a record is not JSON-serialisable ({err})") from err
        write_text(path, text)

    @classmethod
    def restore(cls, path: str | os.PathLike[str]) -> GenerativeBuffer:
        """Rebuild a buffer written by :meth:`snapshot`.

        Raises:
            SnapshotError: the file is not valid JSON, not a buffer snapshot, of another version, or inconsistent.
        """
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SnapshotError(f"{path}: not a buffer snapshot (unreadable JSON: {err})") from err
        if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{path}: not a buffer snapshot (expected format {SNAPSHOT_FORMAT!r})")
        if payload.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"{path}: buffer snapshot version {payload.get('version')!r}; this build reads {SNAPSHOT_VERSION}"
            )
        try:
            return cls.from_records(payload["capacity"], [PromptRecord.from_dict(row) for row in payload["records"]],
                                    staleness_coef=payload["staleness_coef"])
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"{path}: corrupt buffer snapshot ({type(err).__name__}: {err})") from err

    @classmethod
    def from_records(cls, capacity: int, records: Sequence[PromptRecord], *,
                     staleness_coef: float = 0.0) -> GenerativeBuffer:
        """A buffer holding ``records`` (oldest first) as they are, scores and sampling steps included.

        Sampling from it draws what sampling from the buffer they came from would (same order, same priorities).

        Raises:
            ValueError: more records than ``capacity``, or a repeated id.
        """
        buf = cls(capacity, staleness_coef=staleness_coef)
        records = list(records)
        if len(records) > buf.capacity:
            raise ValueError(f"{len(records)} records for capacity {buf.capacity}")
        if len({rec.id for rec in records}) != len(records):
            raise ValueError("duplicate ids")
        buf._append(records)
        return buf

    # ------------------------------------------------------------------ internals

    def _live_slots(self) -> np.ndarray:
        """``[size]`` int64 slots of the held records, oldest first."""
        return self._head + np.flatnonzero(self._alive[self._head : self._end])

    def _slots_of(self, ids: Sequence[str]) -> np.ndarray:
        """``[m]`` int64 slots of held ``ids`` (each must be held)."""
        seqs = np.fromiter((self._seq_of[i] for i in ids), dtype=np.int64, count=len(ids))
        return np.searchsorted(self._seq[: self._end], seqs)

    def _append(self, records: list[PromptRecord]) -> None:
        """Put already-validated, non-duplicate records after the newest one; a non-finite info becomes None."""
        if not records:
            return
        for rec in records:
            if rec.info is not None and not math.isfinite(rec.info):
                rec.info = None
        self._make_room(len(records))
        start, stop = self._end, self._end + len(records)
        seqs = range(self._next_seq, self._next_seq + len(records))
        self._seq[start:stop] = seqs
        self._seq_of.update(zip([rec.id for rec in records], seqs))
        self._next_seq += len(records)
        self._recs[start:stop] = records
        self._info[start:stop] = [np.nan if rec.info is None else rec.info for rec in records]
        self._stale_ref[start:stop] = [_stale_ref(rec) for rec in records]
        self._measured[start:stop] = [rec.info_measured for rec in records]
        self._alive[start:stop] = True
        self._end = stop
        self._count(records, +1)
        self._max_ref = max(self._max_ref, int(self._stale_ref[start:stop].max()))

    def _remove(self, slots: np.ndarray) -> list[PromptRecord]:
        """Remove the records at ``slots [m]`` (live, distinct) and return them in that order."""
        removed: list[PromptRecord] = self._recs[slots].tolist()
        self._alive[slots] = False
        self._recs[slots] = None  # drop the reference so a removed record can be freed
        for rec in removed:
            del self._seq_of[rec.id]
        self._count(removed, -1)
        return removed

    def _count(self, records: list[PromptRecord], sign: int) -> None:
        """Keep the running stats counters in step with inserting (+1) or removing (-1) ``records``."""
        # Counting the batch first (Counter's C loop) and then touching each distinct key once is several times
        # faster than updating the counters record by record.
        generations = Counter([rec.generation for rec in records])
        operators = Counter([rec.operator or "none" for rec in records])
        for counter, delta in ((self._generations, generations), (self._operators, operators)):
            for key, n in delta.items():
                counter[key] += sign * n
                if counter[key] == 0:
                    del counter[key]

    def _make_room(self, n_new: int) -> None:
        """Ensure ``n_new`` free slots after ``_end``: compact out the tombstones and grow if still short.

        After a compaction the arrays hold at least twice the live size, so the next one comes only after as many
        insertions as there are live records: its O(size) numpy cost is amortised to O(1) per insertion.
        """
        if self._end + n_new <= self._alive.size:
            return
        live = self._live_slots()
        size = live.size
        n_slots = max(self._alive.size, 2 * (size + n_new))
        arrays = (("_seq", 0), ("_recs", None), ("_info", np.nan), ("_stale_ref", 0), ("_measured", 0), ("_alive", 0))
        for name, fill in arrays:
            old = getattr(self, name)
            new = np.full(n_slots, fill, dtype=old.dtype)
            new[:size] = old[live]
            setattr(self, name, new)
        self._head, self._end = 0, size

    def _check_invariants(self) -> None:
        """Assert that the slot arrays and the counters agree with the records (for tests)."""
        live = self._live_slots()
        held: list[PromptRecord] = self._recs[live].tolist()
        assert live.size == len(self._seq_of) <= self.capacity
        assert [rec.id for rec in held] == list(self._seq_of), "slot order must be insertion order"
        assert np.all(np.diff(self._seq[: self._end]) > 0), "seq must increase with the slot"
        assert self._seq[live].tolist() == list(self._seq_of.values())
        assert not self._alive[: self._head].any() and not self._alive[self._end :].any()
        assert all(rec is None for rec in self._recs[~self._alive].tolist())
        for slot, rec in zip(live.tolist(), held):
            mirrored = self._info[slot]
            assert (rec.info is None and np.isnan(mirrored)) or rec.info == mirrored
            assert self._stale_ref[slot] == _stale_ref(rec) <= self._max_ref
            assert self._measured[slot] == rec.info_measured
        assert self._generations == Counter(rec.generation for rec in held)
        assert self._operators == Counter(rec.operator or "none" for rec in held)


def _stale_ref(rec: PromptRecord) -> int:
    """The step a record's staleness counts from: its last sample, or its birth if it was never sampled."""
    return rec.step_born if rec.last_sampled_step is None else rec.last_sampled_step


def _normalise(x: np.ndarray) -> np.ndarray:
    """``x [n]`` (non-negative) scaled to sum to 1, or uniform when it sums to 0 (nothing to prefer)."""
    total = x.sum()
    return x / total if total > 0 else np.full(x.size, 1.0 / max(x.size, 1))
