"""The learner group: N DeepSpeed ranks behind one actor handle, so the driver talks to it as to one learner.

``call(method, ...)`` fans the call out to every rank with the same arguments (DeepSpeed's collectives need all of
them) and resolves to rank 0's answer, except:

- ``train_step(batch)``: each rank gets an equal share of whole prompt groups (``eva_ray.batching.split_groups``);
  a rank left without any gets one group to compute on, marked ``padding_only`` so it contributes nothing. The
  ranks return the same global metrics;
- the weight channel's set-up (``open_weight_channel``, ``join_weight_channel``, ``weight_manifest``): rank 0
  alone, since only rank 0 is a member of the channel (the others still take part in every ``push_weights``).

The result is a ``concurrent.futures.Future`` that ``launch.handles.gather`` and ``settle`` wait on like any other;
when a rank fails, a rank that died is reported before the ranks that failed because of it.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from eva_ray.batching import TrainBatch, split_groups
from launch.handles import ActorHandle, is_actor_death, settle

RANK0_ONLY = frozenset({"open_weight_channel", "join_weight_channel", "weight_manifest"})


class LearnerRankError(RuntimeError):
    """A learner rank failed; the message names it."""


class LearnerGroup:
    """Learner ranks ``ranks[0..N-1]`` (rank 0 first) as one :class:`~launch.handles.ActorHandle`."""

    def __init__(self, ranks: list[ActorHandle], name: str = "learner") -> None:
        if not ranks:
            raise ValueError("a learner group needs at least one rank")
        self.ranks = ranks
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="learner-group")

    def call(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if method in RANK0_ONLY:
            futures = [self.ranks[0].call(method, *args, **kwargs)]
        elif method == "train_step":
            futures = self._train_step(*args, **kwargs)
        else:
            futures = [rank.call(method, *args, **kwargs) for rank in self.ranks]
        return self._pool.submit(self._first_answer, method, futures)

    def _train_step(self, batch: TrainBatch, **kwargs: Any) -> list[Any]:
        shares = split_groups(batch, len(self.ranks))
        filler = shares[0]  # there is always at least one group, and it lands on rank 0
        return [rank.call("train_step", part if part is not None else filler, padding_only=part is None, **kwargs)
                for rank, part in zip(self.ranks, shares)]

    def _first_answer(self, method: str, futures: list[Any]) -> Any:
        outcomes = settle(futures)
        failed = [(i, exc) for i, (ok, exc) in enumerate(outcomes) if not ok]
        if failed:
            failed.sort(key=lambda item: not is_actor_death(item[1]))
            i, exc = failed[0]
            rank = self.ranks[i] if len(futures) == len(self.ranks) else self.ranks[0]
            what = "died" if is_actor_death(exc) else "failed"
            if len(self.ranks) == 1:
                raise exc
            raise LearnerRankError(f"{rank.name} {what} in {method}: {type(exc).__name__}: {exc}") from exc
        return outcomes[0][1]

    def shutdown(self) -> None:
        for rank in self.ranks:
            try:
                rank.shutdown()
            except Exception as exc:  # one rank failing to close must not keep the others alive
                print(f"eva-ray: {rank.name} did not close cleanly: {exc}")
        self._pool.shutdown(wait=False)
