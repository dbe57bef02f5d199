"""Children measured before they are drawn (``creator.child_scoring: probe``): the driver's side.

Under ``inherit`` (the default) an evolved child enters the buffer at its parent's score and is drawn at it until it
is trained on, so the harder child of a level-3 parent (a level-4 task this solver never solves) is drawn as often as
its informative parent. Under ``probe``, as ACCEL (Parker-Holder et al., 2022) scores new levels, each child first
gets ``creator.probe_responses`` rollouts of the current policy; the creator admits it at the measured
informativeness, or drops it when the rollouts show no reward spread. The probe rollouts are real generation cost,
so the creator counts them with the trained ones (``creator/rollouts_total``) for comparisons at equal rollouts.

The driver calls :func:`probe_children` once per step, between the creator's ``report`` of one step and its
``next_batch`` of the next (children evolved from step t are then measured by the policy that will train on them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from eva_ray.config import Config
from launch.handles import gather

Retry = Callable[[str, Callable[[], Any]], Any]


def probe_children(cfg: Config, system: Any, step: int, retry: Retry | None = None) -> dict[str, float]:
    """Measure the children waiting in the creator; returns this step's ``probe/`` metrics ({} under inherit).

    ``step``: the step about to begin; admitted children enter the buffer at it (they were born at an earlier one).

    ``retry(what, fn)`` wraps the rollout and reward calls as the driver's step does (a restarted worker's call is
    retried); by default each call is made once.
    """
    if cfg.creator.child_scoring != "probe":
        return {}
    retry = retry if retry is not None else (lambda what, fn: fn())
    t0 = time.perf_counter()
    children = gather([system.creator.call("probe_requests")])[0]
    metrics: dict[str, float] = {"probed": 0, "admitted": 0, "dropped": 0, "unmeasured": 0, "probe_rollouts": 0}
    if children:
        n = cfg.creator.probe_responses
        groups = retry("probe generate", lambda: system.rollout.generate(children, n))
        result = retry("probe reward", lambda: gather([system.reward.call(
            "score", children, [[r.text for r in g] for g in groups])])[0])
        done = gather([system.creator.call("report_probes", step, [c.id for c in children],
                                           result.rewards)])[0]
        metrics.update({k: done[k] for k in metrics})
        scores = list(done["scores"].values())
        metrics["info_mean"] = sum(scores) / len(scores) if scores else float("nan")
    metrics["probe_s"] = time.perf_counter() - t0
    return metrics

