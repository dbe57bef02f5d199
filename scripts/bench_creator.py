"""Benchmark the creator's per-step CPU work: scoring, sampling the buffer, and buffer updates.

The creator runs once per learner step (about 100 ms on a GPU), so each of these must cost a small fraction of that
even at a 100,000-prompt buffer. One simulated step of the mix-up phase:

  score   score_prompts on the minibatch's rewards [mb, n_responses] (metric a_avg)
  sample  buffer.sample(k = mb/2) from a full buffer (weighted without replacement; ``+stale``: rho = 0.1;
          ``greedy``: top-k)
  update  update_scores + mark_trained for the k trained ids, pop them, add mb/2 parents x 4 children (which
          evicts the oldest to keep the size at B)

Run::

    python scripts/bench_creator.py                       # B in {3200, 100000}, mb in {8, 256}
    python scripts/bench_creator.py --capacities 3200 --minibatches 8 --steps 500
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from eva_ray.buffer import GenerativeBuffer  # noqa: E402
from eva_ray.informativeness import score_prompts  # noqa: E402
from eva_ray.records import PromptRecord, make_child  # noqa: E402

N_CHILDREN = 4
OPS = ("score", "sample", "sample+stale", "greedy", "update")


def full_buffer(capacity: int, staleness_coef: float, rng: np.random.Generator) -> GenerativeBuffer:
    """A full buffer; a tenth of the records have no info yet, like evolved children of unscored seeds."""
    buf = GenerativeBuffer(capacity, staleness_coef=staleness_coef)
    info = rng.random(capacity)
    records = [
        PromptRecord(id=f"seed-{i}", text=f"prompt {i}", info=None if i % 10 == 0 else float(info[i]))
        for i in range(capacity)
    ]
    buf.add(records, step=0)
    return buf


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench(capacity: int, minibatch: int, n_responses: int, steps: int, seed: int) -> dict[str, list[float]]:
    """Per-step times in ms for each op over ``steps`` simulated steps of the mix-up phase."""
    rng = np.random.default_rng(seed)
    k = max(1, minibatch // 2)
    buffers = {"sample": full_buffer(capacity, 0.0, rng), "sample+stale": full_buffer(capacity, 0.1, rng)}
    times: dict[str, list[float]] = {op: [] for op in OPS}
    for step in range(1, steps + 1):
        rewards = rng.normal(size=(minibatch, n_responses))
        times["score"].append(timed(lambda: score_prompts(rewards, "a_avg")))
        times["greedy"].append(timed(lambda: buffers["sample"].sample(k, mode="greedy", rng=rng, step=step)))
        for name, buf in buffers.items():
            batch: list[PromptRecord] = []
            times[name].append(timed(lambda: batch.extend(buf.sample(k, mode="sample", rng=rng, step=step))))
            ids = [rec.id for rec in batch]
            scores = rng.random(len(ids))
            children = [
                make_child(rec, f"{rec.prompt_text} (evolved)", operator="deepening", step=step, index=j)
                for rec in batch
                for j in range(N_CHILDREN)
            ]

            def update(buf: GenerativeBuffer = buf) -> None:
                buf.update_scores(ids, scores)
                buf.mark_trained(ids)
                buf.pop(ids)
                buf.add(children, step=step)

            if name == "sample":  # one update timing per step; the other buffer is updated the same way untimed
                times["update"].append(timed(update))
            else:
                update()
            assert len(buf) == capacity
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[3200, 100_000], help="buffer sizes B")
    parser.add_argument("--minibatches", type=int, nargs="+", default=[8, 256], help="prompts per learner step")
    parser.add_argument("--n-responses", type=int, default=8, help="responses (rewards) per prompt")
    parser.add_argument("--steps", type=int, default=300, help="simulated steps per setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    header = f"{'B':>7} {'mb':>4} {'op':<13} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for capacity in args.capacities:
        for minibatch in args.minibatches:
            times = bench(capacity, minibatch, args.n_responses, args.steps, args.seed)
            for op in OPS:
                t = np.asarray(times[op])
                print(
                    f"{capacity:>7} {minibatch:>4} {op:<13} {np.median(t):>10.3f} "
                    f"{np.percentile(t, 95):>8.3f} {t.max():>8.3f}"
                )


if __name__ == "__main__":
    main()
