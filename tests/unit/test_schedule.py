"""The online phase schedule walked through whole runs."""

from collections import Counter
from itertools import groupby

from hypothesis import given, settings, strategies as st

from eva_ray.schedule import PhaseSettings, RunState, n_parents_for, plan_batch, simulate

PAPER = PhaseSettings()  # minibatch 8, B 3200, n_new 4, ratio 0.5, top 50 %, n_new_bootstrap 2


def phases(plans):
    return [(phase, len(list(group))) for phase, group in groupby(p.phase for p in plans)]


def test_paper_numbers_warm_up_takes_200_steps_then_mix_up_then_bootstrap():
    seed_size = 10_000
    plans = simulate(PAPER, seed_size, 3000)
    # Warm-up: 8 from D, 4 parents x 4 children -> the buffer grows 16 per step and is full after 3200/16 = 200.
    assert plans[0] == plan_batch(RunState(0, 0, seed_size), PAPER)
    assert (plans[0].n_seed, plans[0].n_buffer, plans[0].n_parents, plans[0].n_children) == (8, 0, 4, 4)
    # Mix-up: 4 from the buffer, 4 from D; D (10,000 - 1,600 used in warm-up) lasts 8,400 / 4 = 2,100 steps.
    mix = plans[200]
    assert (mix.phase, mix.n_seed, mix.n_buffer, mix.n_parents, mix.n_children) == ("mix-up", 4, 4, 4, 4)
    # Bootstrap: all 8 from the buffer, 2 children per parent.
    boot = plans[2300]
    assert (boot.phase, boot.n_seed, boot.n_buffer, boot.n_parents, boot.n_children) == ("bootstrap", 0, 8, 4, 2)
    assert phases(plans) == [("warm-up", 200), ("mix-up", 2100), ("bootstrap", 700)]
    assert sum(p.n_seed for p in plans) == seed_size
    assert not any(p.short for p in plans)


def test_tiny_run_has_all_three_phases_in_order():
    tiny = PhaseSettings(batch_size=4, capacity=12, n_new=2, n_new_bootstrap=1, ratio_evol=0.5, top_fraction=0.5)
    plans = simulate(tiny, seed_size=32, steps=20)
    # warm-up: +4 per step -> full after 3 steps (12 seeds used); mix-up: 2 seeds a step for 10 steps.
    assert phases(plans) == [("warm-up", 3), ("mix-up", 10), ("bootstrap", 7)]
    # Bootstrap pops 4 and adds 2 x 1: the buffer drains 12 -> 10 -> 8 -> 6 -> 4 -> 2 and the batch runs short.
    assert [p.size for p in plans[13:]] == [4, 4, 4, 4, 4, 2, 1]
    assert [p.short for p in plans[13:]] == [False] * 5 + [True, True]


def test_d_running_out_mid_batch_is_topped_up_from_the_buffer():
    plan = plan_batch(RunState(step=9, buffer_size=50, seed_remaining=3), PhaseSettings(capacity=100))
    assert (plan.phase, plan.n_seed, plan.n_buffer, plan.short) == ("warm-up", 3, 5, False)
    assert plan.pops_trained
    plan = plan_batch(RunState(step=9, buffer_size=100, seed_remaining=1), PhaseSettings(capacity=100))
    assert (plan.phase, plan.n_seed, plan.n_buffer) == ("mix-up", 1, 7)


def test_a_shrunken_buffer_stays_in_mix_up_and_is_topped_up_from_d():
    plan = plan_batch(RunState(step=50, buffer_size=2, seed_remaining=100, warmed_up=True), PhaseSettings(capacity=64))
    assert (plan.phase, plan.n_seed, plan.n_buffer, plan.short) == ("mix-up", 6, 2, False)
    assert plan_batch(RunState(50, 2, 100, warmed_up=False), PhaseSettings(capacity=64)).phase == "warm-up"


def test_empty_buffer_in_bootstrap_plans_nothing_and_says_short():
    plan = plan_batch(RunState(step=5, buffer_size=0, seed_remaining=0), PAPER)
    assert (plan.size, plan.n_parents, plan.short) == (0, 0, True)


def test_ratio_and_top_fraction_rounding():
    assert plan_batch(RunState(0, 100, 100), PhaseSettings(batch_size=7, capacity=100, ratio_evol=0.5)).n_buffer == 4
    assert plan_batch(RunState(0, 100, 100), PhaseSettings(capacity=100, ratio_evol=0.25)).n_buffer == 2
    assert plan_batch(RunState(0, 100, 100), PhaseSettings(capacity=100, ratio_evol=0.0)).n_buffer == 0
    assert plan_batch(RunState(0, 100, 100), PhaseSettings(capacity=100, ratio_evol=1.0)).n_seed == 0
    assert [n_parents_for(b, 0.5) for b in (0, 1, 7, 8, 256)] == [0, 1, 4, 4, 128]
    assert n_parents_for(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert n_parents_for(3, 1.0) == 3


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 32), capacity=st.integers(32, 200), n_new=st.integers(1, 6), n_boot=st.integers(1, 4),
       ratio=st.floats(0, 1), top=st.floats(0.05, 1), seed_size=st.integers(0, 500), steps=st.integers(1, 120))
def test_schedule_invariants(batch, capacity, n_new, n_boot, ratio, top, seed_size, steps):
    s = PhaseSettings(batch, capacity, n_new, n_boot, ratio, top)
    plans = simulate(s, seed_size, steps)
    order = {"warm-up": 0, "mix-up": 1, "bootstrap": 2}
    ranks = [order[p.phase] for p in plans]
    # Phases only move forward, even when popping shrinks a full buffer again.
    assert ranks == sorted(ranks)
    assert sum(p.n_seed for p in plans) <= seed_size
    for p in plans:
        assert 0 <= p.size <= batch and p.n_parents <= p.size
        assert p.short == (p.size < batch)
        assert p.n_children == (n_boot if p.phase == "bootstrap" else n_new)
    counts = Counter(p.phase for p in plans)
    if counts["bootstrap"]:
        assert sum(p.n_seed for p in plans) == seed_size  # bootstrap only once D is used up


def test_bootstrap_refill_raises_children_only_while_the_buffer_is_low():
    paper = PhaseSettings(batch_size=32, capacity=256, n_new=4, n_new_bootstrap=2)
    refill = PhaseSettings(batch_size=32, capacity=256, n_new=4, n_new_bootstrap=2, bootstrap_refill=True)
    low = RunState(step=50, buffer_size=40, seed_remaining=0, warmed_up=True)
    full = RunState(step=50, buffer_size=200, seed_remaining=0, warmed_up=True)
    assert plan_batch(low, paper).n_children == 2
    # after popping 32 of 40, 8 remain: 56 more to reach two minibatches over 16 parents -> 4 (capped at n_new)
    assert plan_batch(low, refill).n_children == 4 and plan_batch(low, refill).n_parents == 16
    assert plan_batch(RunState(50, 60, 0, True), refill).n_children == 3  # 28 left, 36 missing -> ceil(36/16)
    assert plan_batch(full, refill).n_children == 2  # plenty left: the paper's count
    mixup = RunState(step=5, buffer_size=256, seed_remaining=100, warmed_up=True)
    assert plan_batch(mixup, refill).n_children == plan_batch(mixup, paper).n_children == 4
