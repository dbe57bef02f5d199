"""Pretrain (SFT) the chain_sum world's solver: a 1.06M-parameter Llama that answers bare expressions like ``57-87=``.

The model and the format were chosen in an early feasibility study of this world: Llama with hidden 128, 4 layers,
4 heads, FFN 512, tied embeddings; eva-ray's character-level chat tokenizer (:func:`eva_ray.tiny.char_tokenizer`,
103 ids, so the checkpoint works with every code path that already handles the tiny models). Every example is
exactly what the rollout worker will feed and expect:

    prompt   = tokenizer(apply_chat_template([{"role": "user", "content": "57-87="}], add_generation_prompt=True,
                                             tokenize=False), add_special_tokens=False)
             # = <|user|>57-87=<|end|><|assistant|>
    response = "-30" + eos (<|end|>)

with the loss on the response tokens only. Data: fresh reasoning-gym chain_sum tasks every step from the world's
training partition (evaluation expressions are never trained on), levels drawn d=1 40%, d=2 40%, d=3 20% (d=4, 5
never seen). AdamW lr 1e-3 with 50 linear warm-up steps and a cosine decay to 1e-4, batch 128.

Length of training: ``--steps N`` fixes it (and the schedule's horizon); otherwise ``--time-budget`` seconds: the
speed of steps 10..30 sets the horizon once, and the run prints it (``--steps H`` reproduces the run exactly).
Determinism: one seed drives the model's initialisation (``torch.manual_seed``) and the data (a NumPy generator); the
thread count is fixed (``--threads``), so the same command gives the same losses.

At the end: accuracy (reward == 1) and mean reward by level on the world's held-out evaluation set, greedy and sampled
at T=1. The folder (``save_pretrained`` model + tokenizer + ``train_log.json``) loads with AutoModelForCausalLM /
AutoTokenizer.

    python scripts/pretrain_solver.py --out eva_ray/worlds/checkpoints/chain_sum_solver     # ~270 s on 2 cores
    python scripts/pretrain_solver.py --out /tmp/solver --steps 20 --eval-per-level 0

``--init FOLDER`` continues from a saved solver (its weights, same shape and tokenizer) instead of a fresh
initialisation, e.g. more training on the frontier levels of the shipped one:

    python scripts/pretrain_solver.py --init eva_ray/worlds/checkpoints/chain_sum_solver --mix 1:0.1,2:0.3,3:0.6 \
        --lr 5e-4 --min-lr 5e-5 --steps 1500 --out /tmp/solver_l3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eva_ray.lr_schedule import warmup_cosine  # noqa: E402
from eva_ray.tiny import char_tokenizer, tiny_solver  # noqa: E402
from eva_ray.worlds import chain_sum  # noqa: E402

MODEL_SHAPE = dict(hidden=128, layers=4, heads=4, intermediate=512, max_positions=128)
CALIBRATE = (10, 30)  # steps whose speed sets the horizon under a time budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SFT of the chain_sum solver",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (save_pretrained model + tokenizer)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (also the cosine horizon); "
                   "unset: as many as --time-budget allows")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds of training (evaluation excluded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this saved solver folder instead of a fresh model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--mix", default="1:0.4,2:0.4,3:0.2", help="level:weight,... of the training data")
    p.add_argument("--num-terms", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, for reproducible losses; on a "
                   "shared 2-core machine 1 is about 3x faster than 2)")
    p.add_argument("--eval-per-level", type=int, default=200, help="held-out items per level (0: no evaluation)")
    p.add_argument("--eval-levels", default="1,2,3,4,5")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


class Encoder:
    """Turns tasks into the rollout worker's prompt ids plus response ids, checked against the real tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def prompt_ids(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def batch(self, tasks: list[chain_sum.Task]) -> dict[str, torch.Tensor]:
        prompts = [self.prompt_ids(t.text) for t in tasks]
        answers = self.tokenizer([t.answer for t in tasks], add_special_tokens=False)["input_ids"]
        seqs = [p + a + [self.eos] for p, a in zip(prompts, answers)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, seqs)):  # right padding: positions 0.. as in unpadded generation
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(p): len(s)] = torch.tensor(s[len(p):])  # loss on the answer and its eos only
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sample_tasks(rng: np.random.Generator, n: int, levels: list[int], probs: np.ndarray,
                 num_terms: int) -> list[chain_sum.Task]:
    return [chain_sum.sample_task(int(levels[i]), num_terms, rng) for i in rng.choice(len(levels), size=n, p=probs)]


def build_model(tokenizer: Any, seed: int) -> Any:
    return tiny_solver(tokenizer, seed=seed, **MODEL_SHAPE)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    mix = {int(k): float(v) for k, v in (part.split(":") for part in args.mix.split(","))}
    levels = sorted(mix)
    probs = np.array([mix[d] for d in levels], dtype=float)
    probs /= probs.sum()
    tokenizer = char_tokenizer()
    encoder = Encoder(tokenizer)
    model = build_model(tokenizer, args.seed)
    if args.init:
        from transformers import LlamaForCausalLM

        # Same shape and tokenizer as a fresh model: only the weights come from the saved solver (strict load).
        model.load_state_dict(LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32).state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    data_rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0x5F7]))
    horizon = args.steps
    losses: list[float] = []
    tokens = 0
    model.train()
    t_start = time.perf_counter()
    t_calib = None
    step = 0
    while True:
        if args.steps is not None and step >= args.steps:
            break
        elapsed = time.perf_counter() - t_start
        if args.steps is None and (elapsed >= args.time_budget or (horizon is not None and step >= horizon)):
            break
        if args.steps is None:
            if step == CALIBRATE[0]:
                t_calib = time.perf_counter()
            if step == CALIBRATE[1]:
                per_step = (time.perf_counter() - t_calib) / (CALIBRATE[1] - CALIBRATE[0])
                horizon = CALIBRATE[1] + int((args.time_budget - elapsed) / per_step)
                print(f"horizon: {horizon} steps ({per_step * 1000:.0f} ms/step); reproduce with --steps {horizon}",
                      flush=True)
        lr = warmup_cosine(step, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                   horizon=horizon if horizon is not None else 10**9)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = encoder.batch(sample_tasks(data_rng, args.batch_size, levels, probs, args.num_terms))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        step += 1
        if args.log_every and step % args.log_every == 0:
            print(f"step {step} loss {np.mean(losses[-args.log_every:]):.4f} lr {lr:.2e} "
                  f"{time.perf_counter() - t_start:.0f}s", flush=True)
    train_s = time.perf_counter() - t_start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    evaluation: dict[str, Any] = {}
    if args.eval_per_level > 0:
        t0 = time.perf_counter()
        eval_levels = [int(x) for x in args.eval_levels.split(",")]
        records = chain_sum.eval_set(args.eval_per_level, seed=args.seed, levels=eval_levels,
                                     num_terms=args.num_terms)
        evaluation = {"greedy": chain_sum.evaluate_solver(model, tokenizer, records, temperature=0.0),
                      "sampled_t1": chain_sum.evaluate_solver(model, tokenizer, records, temperature=1.0,
                                                              seed=args.seed)}
        evaluation["eval_s"] = time.perf_counter() - t0
    log = {"args": vars(args), "steps": step, "horizon": horizon if horizon is not None else step,
           "train_s": train_s, "tokens_per_s": tokens / train_s if train_s else 0.0, "params": n_params,
           "losses": losses, "eval": {k: ({str(d): v for d, v in t.items()} if isinstance(t, dict) else t)
                                      for k, t in evaluation.items()}}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def print_table(log: dict[str, Any]) -> None:
    ev = log["eval"]
    print(f"steps {log['steps']} in {log['train_s']:.0f}s ({log['tokens_per_s']:.0f} tokens/s), "
          f"{log['params'] / 1e6:.2f}M params, final loss {np.mean(log['losses'][-50:]):.4f}")
    if not ev:
        return
    print("level   n   greedy acc (reward)   sampled T=1 acc (reward)")
    for d, g in ev["greedy"].items():
        s = ev["sampled_t1"][d]
        print(f"  {d}  {g['n']:4d}     {g['accuracy']:.3f} ({g['mean_reward']:.3f})"
              f"          {s['accuracy']:.3f} ({s['mean_reward']:.3f})")


def main(argv: list[str] | None = None) -> None:
    log = train(parse_args(argv))
    print_table(log)


if __name__ == "__main__":
    main()
