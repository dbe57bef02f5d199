"""Size and time of one learner checkpoint (DeepSpeed save_checkpoint + learner.json), and of loading it back.

    python scripts/bench_checkpoint.py --config configs/smollm2-mtbench.yaml --out /tmp/ckpt-bench

Builds the config's learner alone (no Ray, no other actors), applies one RLOO update on a synthetic batch so the
AdamW moments exist, then saves the checkpoint ``--repeat`` times and loads it once. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/chain_sum.yaml")
    parser.add_argument("--out", default="/tmp/eva-ray-ckpt-bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from actors.learner import Learner
    from eva_ray.batching import collate
    from eva_ray.config import load_config
    from eva_ray.rollouts import Rollout
    from launch.driver import with_resolved_models

    cfg = with_resolved_models(load_config(args.config, args.overrides))
    learner = Learner(cfg.model.path, solver=cfg.solver, learner=cfg.learner, model=cfg.model,
                      total_steps=cfg.run.total_steps, seed=cfg.run.seed, temperature=cfg.rollout.temperature)
    n_params = sum(p.numel() for p in learner.engine.module.parameters())
    gen = torch.Generator().manual_seed(0)
    vocab = min(200, learner.engine.module.config.vocab_size)
    prompts = [torch.randint(3, vocab, (12,), generator=gen).tolist() for _ in range(2)]
    groups = [[Rollout(f"p{i}", prompt, torch.randint(3, vocab, (16,), generator=gen).tolist(), "", "length", 0)
               for _ in range(2)] for i, prompt in enumerate(prompts)]
    learner.train_step(collate(groups, [[0.0, 1.0], [1.0, 0.0]], 0))
    out = Path(args.out)
    saves = []
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        info = learner.save_checkpoint(str(out))
        saves.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    learner.load_checkpoint(str(out))
    load_s = time.perf_counter() - t0
    learner.close()
    print(json.dumps({"config": args.config, "model": cfg.model.path, "parameters": n_params,
                      "zero_stage": cfg.learner.zero_stage, "dtype": cfg.model.dtype, "bytes": info["bytes"],
                      "save_s": [round(s, 3) for s in saves], "load_s": round(load_s, 3),
                      "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}))


if __name__ == "__main__":
    main()
