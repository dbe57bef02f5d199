"""The rollout group: N rollout workers that split each batch between them and answer in the batch's order.

Weights reach the workers over the weight channel (``launch/weight_sync.py``), never through this group or the
driver.
"""

from __future__ import annotations

from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout, shard, unshard
from launch.handles import ActorHandle, gather


class RolloutGroup:
    """Shards prompts over workers and reassembles their rollouts in prompt order."""

    def __init__(self, workers: list[ActorHandle]) -> None:
        if not workers:
            raise ValueError("a rollout group needs at least one worker")
        self.workers = workers

    def generate(self, prompts: list[PromptRecord], n: int, *, greedy: bool = False) -> list[list[Rollout]]:
        shards = shard(prompts, len(self.workers))
        futures = [w.call("generate", part, n, greedy=greedy) for w, part in zip(self.workers, shards) if part]
        results = gather(futures)
        non_empty = [part for part in shards if part]
        return unshard(results, [len(p) for p in non_empty])
