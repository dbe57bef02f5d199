"""GenerativeBuffer: capacity and eviction, prioritized sampling, score updates, stats, snapshot/restore, and a
hypothesis state machine that checks the buffer against a plain ordered-dict model."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eva_ray.buffer import AddResult, GenerativeBuffer, SnapshotError, UpdateResult
from eva_ray.records import PromptRecord, make_child


def rec(name: str, info: float | None = None, **kw) -> PromptRecord:
    return PromptRecord(id=name, text=f"text of {name}", info=info, **kw)


def filled(capacity: int, infos: list[float | None], **kw) -> GenerativeBuffer:
    buf = GenerativeBuffer(capacity, **kw)
    buf.add([rec(f"p{i}", info) for i, info in enumerate(infos)], step=0)
    return buf


# ---------------------------------------------------------------------------------------------------- add / evict


def test_add_keeps_insertion_order_and_rejects_duplicates():
    buf = filled(10, [1.0, 2.0])
    result = buf.add([rec("p1"), rec("a"), rec("b"), rec("a")], step=1)
    assert result == AddResult(added=("a", "b"), rejected=("p1", "a"), evicted=())
    assert buf.ids() == ["p0", "p1", "a", "b"]
    assert len(buf) == 4 and "a" in buf and "zzz" not in buf
    assert buf.get("p1").info == 2.0 and buf.get("zzz") is None  # the original p1 was kept, not replaced


def test_add_over_capacity_evicts_the_oldest():
    buf = filled(3, [1.0, 2.0, 3.0])
    result = buf.add([rec("a"), rec("b")], step=1)
    assert result.evicted == ("p0", "p1")
    assert buf.ids() == ["p2", "a", "b"]


def test_a_batch_larger_than_capacity_keeps_its_newest_records():
    buf = filled(3, [1.0])
    result = buf.add([rec(f"n{i}") for i in range(5)], step=1)
    assert result.added == ("n2", "n3", "n4")
    assert result.evicted == ("p0", "n0", "n1")
    assert buf.ids() == ["n2", "n3", "n4"]


def test_add_validates_everything_before_changing_anything():
    buf = filled(5, [1.0])
    with pytest.raises(ValueError, match="after the add step 3"):
        buf.add([rec("ok"), rec("late", step_born=4)], step=3)
    with pytest.raises(TypeError, match="PromptRecord"):
        buf.add([rec("ok"), {"id": "x"}], step=3)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="info must be a real number"):
        buf.add([rec("ok"), rec("bad", "high")], step=3)  # type: ignore[arg-type]
    assert buf.ids() == ["p0"]


def test_non_finite_info_becomes_no_info():
    buf = GenerativeBuffer(4)
    buf.add([rec("a", math.nan), rec("b", math.inf), rec("c", 0.5)], step=0)
    assert [r.info for r in buf.records()] == [None, None, 0.5]


def test_re_adding_a_popped_id_puts_it_last():
    buf = filled(5, [1.0, 2.0, 3.0])
    buf.pop(["p0"])
    buf.add([rec("p0", 9.0)], step=1)
    assert buf.ids() == ["p1", "p2", "p0"] and buf.get("p0").info == 9.0


def test_pop_and_evict_oldest():
    buf = filled(6, [1.0, 2.0, 3.0, 4.0, 5.0])
    popped = buf.pop(["p3", "nope", "p1", "p3"])
    assert [r.id for r in popped] == ["p3", "p1"]  # given order, unknown and repeated ids ignored
    assert [r.id for r in buf.evict_oldest(2)] == ["p0", "p2"]
    assert buf.ids() == ["p4"]
    assert buf.evict_oldest(0) == []
    with pytest.raises(ValueError, match="cannot evict 2"):
        buf.evict_oldest(2)


def test_mixup_step_keeps_the_size_at_capacity():
    # Paper appendix A: sample from the buffer, train, pop the trained, add the children, evict the oldest.
    buf = filled(8, [float(i) for i in range(8)])
    rng = np.random.default_rng(0)
    batch = buf.sample(4, rng=rng, step=1)
    ids = [r.id for r in batch]
    buf.update_scores(ids, [1.0, 2.0, 3.0, 4.0])
    buf.mark_trained(ids)
    children = [make_child(p, p.text + "?", operator="deepening", step=1, index=j) for p in batch for j in range(4)]
    buf.pop(ids)
    result = buf.add(children, step=1)
    assert len(buf) == 8 and len(result.evicted) == 12
    assert not set(ids) & set(buf.ids())
    assert {r.id for r in buf.records()} <= {c.id for c in children}


# ---------------------------------------------------------------------------------------------------- sampling


def test_greedy_sample_takes_the_highest_info_and_stamps_it():
    buf = filled(5, [0.1, 5.0, None, 3.0, 4.0])
    batch = buf.sample(2, mode="greedy", rng=np.random.default_rng(0), step=7)
    assert [r.id for r in batch] == ["p1", "p4"]
    assert [r.last_sampled_step for r in buf.records()] == [None, 7, None, None, 7]


def test_children_inherit_parent_priority_until_measured():
    hot, cold = rec("hot", 9.0), rec("cold", 0.1)
    buf = GenerativeBuffer(10)
    buf.add([make_child(p, "x", operator="persona", step=1, index=0) for p in (cold, hot)], step=1)
    assert [r.id for r in buf.sample(1, mode="greedy", rng=np.random.default_rng(0), step=1)] == ["hot/s1c0"]


def test_records_without_info_are_drawn_only_when_the_rest_run_out():
    buf = filled(5, [None, 2.0, None, 1.0, None])
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert {r.id for r in buf.sample(2, rng=rng, step=0)} == {"p1", "p3"}
    picked = buf.sample(4, rng=rng, step=0)
    assert {r.id for r in picked[:2]} == {"p1", "p3"} and {r.id for r in picked[2:]} <= {"p0", "p2", "p4"}


def test_all_records_without_info_sample_uniformly():
    buf = filled(4, [None] * 4)
    rng = np.random.default_rng(1)
    counts = {i: 0 for i in buf.ids()}
    for _ in range(2000):
        counts[buf.sample(1, rng=rng, step=0)[0].id] += 1
    assert min(counts.values()) > 420  # ~500 each


def test_sampling_probs_without_staleness_are_info_proportional():
    buf = filled(4, [1.0, 3.0, None, -2.0])
    np.testing.assert_allclose(buf.sampling_probs(0), [0.25, 0.75, 0.0, 0.0])


def test_staleness_mixture_hand_computed():
    # rho = 0.5; at step 10: P_score = [1, 0, 0] / 1; staleness = [10 - 0, 10 - 6 (sampled), 10 - 8 (born)] = [10, 4, 2]
    buf = GenerativeBuffer(3, staleness_coef=0.5)
    buf.add([rec("a", 1.0), rec("b", 0.0, last_sampled_step=6), rec("c", None, step_born=8)], step=8)
    probs = buf.sampling_probs(10)
    np.testing.assert_allclose(probs, 0.5 * np.array([1.0, 0.0, 0.0]) + 0.5 * np.array([10, 4, 2]) / 16)
    assert probs.sum() == pytest.approx(1.0)


def test_staleness_lets_zero_info_records_be_drawn():
    buf = filled(3, [1.0, 0.0, 0.0], staleness_coef=1.0)
    rng = np.random.default_rng(0)
    first = buf.sample(1, rng=rng, step=5)[0].id
    # Pure staleness: the record just sampled at step 5 has staleness 0 and loses to the two never-sampled ones.
    assert first not in {r.id for r in buf.sample(2, rng=rng, step=5)}


def test_sample_errors_leave_the_buffer_unchanged():
    buf = filled(3, [1.0, 2.0])
    with pytest.raises(ValueError, match="cannot select 3"):
        buf.sample(3, rng=np.random.default_rng(0), step=1)
    with pytest.raises(ValueError, match="sample, greedy"):
        buf.sample(1, mode="best", rng=np.random.default_rng(0), step=1)
    assert all(r.last_sampled_step is None for r in buf.records())
    buf.sample(1, rng=np.random.default_rng(0), step=4)
    with pytest.raises(ValueError, match="earlier than step 4"):
        buf.sample(1, rng=np.random.default_rng(0), step=3)


# ---------------------------------------------------------------------------------------------------- scores


def test_update_scores_sets_measured_info_and_keeps_prior_on_nan():
    buf = filled(4, [1.0, 2.0, 3.0])
    result = buf.update_scores(["p0", "p1", "gone", "p2"], [5.0, math.nan, 1.0, math.inf])
    assert result == UpdateResult(updated=1, kept_prior=2, unknown=("gone",))
    assert [(r.info, r.info_measured) for r in buf.records()] == [(5.0, True), (2.0, False), (3.0, False)]
    # The new score drives sampling straight away.
    assert buf.sample(1, mode="greedy", rng=np.random.default_rng(0), step=0)[0].id == "p0"
    with pytest.raises(ValueError, match="2 ids but 1 scores"):
        buf.update_scores(["p0", "p1"], [1.0])


def test_caller_may_set_info_on_the_record_before_reporting_it():
    # The creator scores a whole minibatch on the records themselves, then reports the buffer's share.
    buf = filled(3, [1.0, 2.0])
    held = buf.get("p0")
    held.info, held.info_measured = 7.0, True
    buf.update_scores(["p0"], [held.info])
    buf._check_invariants()
    assert buf.stats()["measured_fraction"] == 0.5
    buf.pop(["p0"])
    assert buf.stats()["measured_fraction"] == 0.0


def test_mark_trained_counts():
    buf = filled(3, [1.0, 2.0])
    assert buf.mark_trained(["p0", "p0", "x", "p1"]) == 3
    assert [r.times_trained for r in buf.records()] == [2, 1]


# ---------------------------------------------------------------------------------------------------- reporting


def test_stats_hand_computed():
    buf = GenerativeBuffer(10)
    seeds = [rec("s0", 1.0), rec("s1", 3.0)]
    kids = [make_child(seeds[0], "k", operator="persona", step=1, index=i) for i in range(2)]
    grandkid = make_child(kids[0], "g", operator="deepening", step=2, index=0)
    buf.add(seeds + kids + [grandkid, rec("none")], step=2)
    buf.update_scores(["s1", "s0/s1c1"], [4.0, 2.0])
    stats = buf.stats()
    # infos: s0 1, s1 4 (measured), kids 1 and 2 (measured), grandkid 1, "none" has no info -> [1, 1, 1, 2, 4]
    assert stats == {
        "size": 6,
        "capacity": 10,
        "generations": {0: 3, 1: 2, 2: 1},
        "operators": {"deepening": 1, "none": 3, "persona": 2},
        "info_quantiles": {"p0": 1.0, "p25": 1.0, "p50": 1.0, "p75": 2.0, "p100": 4.0},
        "n_with_info": 5,
        "measured_fraction": 2 / 6,
    }
    buf.pop(["s1"])
    assert buf.stats()["measured_fraction"] == 1 / 5 and buf.stats()["generations"][0] == 2
    assert GenerativeBuffer(2).stats()["info_quantiles"]["p50"] is None


def test_texts_oldest_first_for_plain_and_chat_prompts():
    buf = GenerativeBuffer(3)
    chat = PromptRecord(id="c", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    buf.add([rec("a"), chat], step=0)
    assert buf.texts() == ["text of a", "hi"]


# ---------------------------------------------------------------------------------------------------- persistence


def test_snapshot_round_trip_preserves_records_order_settings_and_sampling(tmp_path):
    buf = filled(6, [1.0, None, 3.0, 0.5, 2.0], staleness_coef=0.25)
    buf.add([PromptRecord(id="m", messages=[{"role": "user", "content": "q"}], meta={"difficulty": 3})], step=1)
    buf.pop(["p2"])
    buf.sample(2, rng=np.random.default_rng(0), step=2)
    path = tmp_path / "buffer.json"
    buf.snapshot(path)
    restored = GenerativeBuffer.restore(path)
    assert restored == buf and restored.ids() == buf.ids()
    assert restored.staleness_coef == 0.25 and restored.capacity == 6
    assert restored.get("m").meta == {"difficulty": 3}
    # Same draws from the same seed: the restored buffer is the same sampler, not just the same set.
    a = [r.id for r in buf.sample(3, rng=np.random.default_rng(5), step=3)]
    b = [r.id for r in restored.sample(3, rng=np.random.default_rng(5), step=3)]
    assert a == b
    assert [p.name for p in tmp_path.iterdir()] == ["buffer.json"]  # no temporary file left behind


def test_failed_snapshot_keeps_the_previous_file(tmp_path):
    path = tmp_path / "buffer.json"
    buf = filled(3, [1.0])
    buf.snapshot(path)
    before = path.read_text()
    buf.add([PromptRecord(id="bad", text="x", meta={"obj": object()})], step=0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        buf.snapshot(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["buffer.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "unreadable JSON"),
        ('{"format": "something-else", "version": 1}', "not a buffer snapshot"),
        ('{"format": "eva-ray/generative-buffer", "version": 99}', "version 99; this build reads 1"),
        ('{"format": "eva-ray/generative-buffer", "version": 1, "capacity": 2}', "corrupt"),
        (
            '{"format": "eva-ray/generative-buffer", "version": 1, "capacity": 2, "staleness_coef": 0, '
            '"records": [{"id": "a", "text": "x", "colour": "red"}]}',
            "corrupt",
        ),
        (
            '{"format": "eva-ray/generative-buffer", "version": 1, "capacity": 2, "staleness_coef": 0, '
            '"records": [{"id": "a", "text": "x", "step_born": "soon"}]}',
            "corrupt",
        ),
        (
            '{"format": "eva-ray/generative-buffer", "version": 1, "capacity": 1, "staleness_coef": 0, '
            '"records": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]}',
            "2 records for capacity 1",
        ),
    ],
)
def test_restore_rejects_bad_files_clearly(tmp_path, content, message):
    path = tmp_path / "buffer.json"
    path.write_text(content)
    with pytest.raises(SnapshotError, match=message):
        GenerativeBuffer.restore(path)


def test_constructor_validates_settings():
    with pytest.raises(ValueError, match="capacity"):
        GenerativeBuffer(0)
    with pytest.raises(ValueError, match="staleness_coef"):
        GenerativeBuffer(3, staleness_coef=1.5)


def test_compaction_keeps_order_across_many_insertions():
    # Far more insertions than slots forces repeated compaction of the tombstones.
    buf = GenerativeBuffer(50)
    for step in range(40):
        buf.add([rec(f"s{step}-{i}", float(i)) for i in range(20)], step=step)
        buf.pop([f"s{step}-{i}" for i in range(0, 20, 3)])
        buf._check_invariants()
    assert len(buf) == 50 - 7 and buf.ids()[-1] == "s39-19"  # full, then 7 of the last batch popped


# ---------------------------------------------------------------------------------------------------- properties

INFO = st.one_of(st.none(), st.floats(0, 10), st.just(math.nan))


class BufferMachine(RuleBasedStateMachine):
    """Random add / sample / update / pop / evict / snapshot-restore sequences against an ordered-dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.buf: GenerativeBuffer | None = None
        self.model: dict[str, float | None] = {}  # id -> info, oldest first
        self.step = 0
        self.next_id = 0

    def teardown(self) -> None:
        self.tmp.cleanup()

    @precondition(lambda self: self.buf is None)
    @rule(capacity=st.integers(1, 8), rho=st.sampled_from([0.0, 0.3, 1.0]))
    def create(self, capacity, rho):
        self.buf = GenerativeBuffer(capacity, staleness_coef=rho)

    @precondition(lambda self: self.buf is not None)
    @rule(infos=st.lists(INFO, max_size=10), dup=st.booleans(), advance=st.booleans())
    def add(self, infos, dup, advance):
        self.step += advance
        new = []
        for info in infos:
            new.append(rec(f"r{self.next_id}", info, step_born=self.step))
            self.next_id += 1
        if dup and self.model:
            new.append(rec(next(iter(self.model)), 1.0))  # an id already held
        if dup and new:
            new.append(rec(new[0].id, 2.0))  # an id repeated within the call
        held_before = set(self.model)
        seen, expected_rejected = set(held_before), []
        for r in new:
            if r.id in seen:
                expected_rejected.append(r.id)
            seen.add(r.id)
        result = self.buf.add(new, step=self.step)
        assert list(result.rejected) == expected_rejected
        for r in new:
            if r.id in result.added and r.id not in self.model:  # the first of a repeated id is the one kept
                self.model[r.id] = r.info
        for gone in result.evicted:
            self.model.pop(gone, None)
        # Oldest-first eviction: the model must now be exactly the buffer, which must be full if anything went.
        assert list(self.model) == self.buf.ids()
        if result.evicted:
            assert len(self.buf) == self.buf.capacity
        # Every new record is accounted for once: added, rejected, or dropped at once for lack of room.
        dropped_new = sum(i not in held_before for i in result.evicted)
        assert len(result.added) + len(result.rejected) + dropped_new == len(new)

    @precondition(lambda self: self.buf is not None and len(self.buf) > 0)
    @rule(data=st.data(), mode=st.sampled_from(["sample", "greedy"]), seed=st.integers(0, 2**32 - 1))
    def sample(self, data, mode, seed):
        k = data.draw(st.integers(0, len(self.buf)))
        self.step += 1
        batch = self.buf.sample(k, mode=mode, rng=np.random.default_rng(seed), step=self.step)
        ids = [r.id for r in batch]
        assert len(ids) == len(set(ids)) == k and set(ids) <= set(self.model)
        assert all(r.last_sampled_step == self.step for r in batch)
        if mode == "greedy" and k:
            # Greedy never leaves out a record whose priority beats one it took.
            infos = {i: (v if v is not None and math.isfinite(v) else 0.0) for i, v in self.model.items()}
            if self.buf.staleness_coef == 0:
                assert min(infos[i] for i in ids) >= max((v for i, v in infos.items() if i not in ids), default=0)

    @precondition(lambda self: self.buf is not None)
    @rule(data=st.data())
    def update(self, data):
        ids = data.draw(st.lists(st.sampled_from(list(self.model) + ["ghost"]), max_size=5, unique=True))
        scores = data.draw(st.lists(INFO.filter(lambda x: x is not None), min_size=len(ids), max_size=len(ids)))
        result = self.buf.update_scores(ids, scores)
        assert result.unknown == (("ghost",) if "ghost" in ids else ())
        for i, s in zip(ids, scores):
            if i in self.model and math.isfinite(s):
                self.model[i] = s
        assert result.updated + result.kept_prior + len(result.unknown) == len(ids)

    @precondition(lambda self: self.buf is not None)
    @rule(data=st.data())
    def pop(self, data):
        ids = data.draw(st.lists(st.sampled_from(list(self.model) + ["ghost"]), max_size=5))
        popped = self.buf.pop(ids)
        expected = [i for i in dict.fromkeys(ids) if i in self.model]
        assert [r.id for r in popped] == expected
        for i in expected:
            del self.model[i]
            assert i not in self.buf and self.buf.get(i) is None

    @precondition(lambda self: self.buf is not None)
    @rule(data=st.data())
    def evict(self, data):
        n = data.draw(st.integers(0, len(self.buf)))
        evicted = self.buf.evict_oldest(n)
        assert [r.id for r in evicted] == list(self.model)[:n]
        for r in evicted:
            del self.model[r.id]

    @precondition(lambda self: self.buf is not None and len(self.buf) > 0)
    @rule()
    def snapshot_restore(self):
        path = Path(self.tmp.name) / "buffer.json"
        self.buf.snapshot(path)
        restored = GenerativeBuffer.restore(path)
        assert restored == self.buf
        restored._check_invariants()
        self.buf = restored  # carry on with the restored copy, so later rules exercise it too

    @invariant()
    def consistent(self):
        if self.buf is None:
            return
        self.buf._check_invariants()
        assert len(self.buf) <= self.buf.capacity
        assert self.buf.ids() == list(self.model)
        assert [r.info for r in self.buf.records()] == [
            v if v is not None and math.isfinite(v) else None for v in self.model.values()
        ]
        assert json.loads(json.dumps(self.buf.stats()))  # stats stay JSON-loggable


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(max_examples=100, stateful_step_count=15, deadline=None)
