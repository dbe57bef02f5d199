"""The rollout group: N rollout workers that split each batch between them and answer in the batch's order."""

from __future__ import annotations

from typing import Any, Callable

from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout, shard, unshard
from launch.handles import ActorHandle, gather


class RolloutGroup:
    """Shards prompts over workers, reassembles rollouts in prompt order, and pushes versioned weights to all."""

    def __init__(self, workers: list[ActorHandle], share: Callable[[Any], Any] = lambda x: x) -> None:
        if not workers:
            raise ValueError("a rollout group needs at least one worker")
        self.workers = workers
        # How a large object reaches every worker once: ray.put under Ray (one copy in the object store, fetched
        # by each worker), the object itself inline.
        self.share = share

    def generate(self, prompts: list[PromptRecord], n: int, *, greedy: bool = False) -> list[list[Rollout]]:
        shards = shard(prompts, len(self.workers))
        futures = [w.call("generate", part, n, greedy=greedy) for w, part in zip(self.workers, shards) if part]
        results = gather(futures)
        non_empty = [part for part in shards if part]
        return unshard(results, [len(p) for p in non_empty])

    def update_weights(self, weights: dict[str, Any], version: int) -> None:
        shared = self.share(weights)
        gather([w.call("update_weights", shared, version) for w in self.workers])
