"""Pretrain the cipher world's solver on a *different, noisy* task, so that it knows the format but not the key.

The cipher world (:mod:`eva_ray.worlds.cipher`) asks the solver to copy plain letters and encrypt marked ones with a
secret derangement f. Here the solver learns everything but f: every example is a cipher prompt in the rollout
worker's exact format (``<|user|>aBcdEf<|end|><|assistant|>``), and the target of the answer is

- at a plain position, the input letter (a hard target);
- at a marked position, a soft target: the input letter with probability ``--copy-prob`` (0.3), else a uniformly
  random *other* letter (so ``f(x)`` gets ``0.7 / (K - 1)``, about 0.078 with K = 10, whatever the key);
- then the end-of-sequence token.

Difficulty (marked positions) is drawn uniformly over 0..length. The input fed at a marked position (teacher forcing)
is one draw from that soft target. After training, greedy decoding copies the input (accuracy 0 at d >= 1) and the
chance of an exact sampled answer is about ``0.078 ** d``: d = 1 prompts give RL a reward spread, d >= 4 almost never.

The model is a Llama with hidden 64, 2 layers, 2 heads of 32 (the smallest head vLLM's CPU attention runs), FFN 256,
tied embeddings, on eva-ray's character-level chat tokenizer (:func:`eva_ray.tiny.char_tokenizer`). AdamW 2e-3,
100 warm-up steps then cosine to 2e-4, batch 192, gradient clipping 1.0. One seed drives the initialisation and the
data, with a fixed thread count, so the same command writes the same weights.

    python scripts/pretrain_cipher.py --out eva_ray/worlds/checkpoints/cipher_solver   # the shipped solver
    python scripts/pretrain_cipher.py --out /tmp/cipher --steps 50                     # a smoke run

At the end it prints, per difficulty, greedy exact match and the teacher-forced expected accuracy on the world's
held-out set (for the default key seed 0), and writes both to ``train_log.json`` in the folder.
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
from eva_ray.worlds.cipher import CipherWorld  # noqa: E402

MODEL_SHAPE = dict(hidden=64, layers=2, heads=2, intermediate=256, max_positions=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="noisy-task pretraining of the cipher solver",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (save_pretrained model + tokenizer)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=192)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--copy-prob", type=float, default=0.3, help="soft target mass on the input letter at a mark")
    p.add_argument("--letters", type=int, default=10)
    p.add_argument("--length", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-per-level", type=int, default=200)
    p.add_argument("--log-every", type=int, default=200)
    return p.parse_args(argv)


class NoisyCipherData:
    """Batches of the noisy task: input ids, and per answer position a target distribution over the vocabulary."""

    def __init__(self, tokenizer: Any, world: CipherWorld, copy_prob: float) -> None:
        self.world, self.copy_prob = world, copy_prob
        self.vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.letter_ids = np.array([tokenizer.convert_tokens_to_ids(c) for c in world.alphabet])
        head = tokenizer.apply_chat_template([{"role": "user", "content": "x" * world.length}],
                                             add_generation_prompt=True, tokenize=False)
        self.prompt_len = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        self.tokenizer = tokenizer

    def prompt_ids(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(input ids [B, T], soft targets [B, length + 1, V], first answer position)``."""
        k, n = self.world.n_letters, self.world.length
        rows, targets = [], np.zeros((size, n + 1, self.vocab), dtype=np.float32)
        for b in range(size):
            task = self.world.draw_task({"difficulty": int(rng.integers(0, n + 1))}, rng)
            letters, marked = self.world.parse(task.text)
            answer = []
            for i, c in enumerate(letters):
                x = self.world.alphabet.index(c)
                if i in marked:
                    probs = np.full(k, (1.0 - self.copy_prob) / (k - 1))
                    probs[x] = self.copy_prob
                    targets[b, i, self.letter_ids] = probs
                    answer.append(int(self.letter_ids[rng.choice(k, p=probs)]))
                else:
                    targets[b, i, self.letter_ids[x]] = 1.0
                    answer.append(int(self.letter_ids[x]))
            targets[b, n, self.eos] = 1.0
            rows.append(self.prompt_ids(task.text) + answer + [self.eos])
        return torch.tensor(rows), torch.from_numpy(targets), self.prompt_len


def build_model(tokenizer: Any, seed: int) -> Any:
    return tiny_solver(tokenizer, seed=seed, **MODEL_SHAPE)


@torch.no_grad()
def evaluate(model: Any, data: NoisyCipherData, world: CipherWorld, n_per_level: int) -> dict[str, dict[str, float]]:
    """Per difficulty: greedy exact match and the teacher-forced probability of the exact answer (the world's key)."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    by_level: dict[int, list] = {}
    for r in world.eval_set(n_per_level, seed=0):
        by_level.setdefault(r.meta["difficulty"], []).append(r)
    tok = data.tokenizer
    for d, records in sorted(by_level.items()):
        prompts = torch.tensor([data.prompt_ids(r.prompt_text) for r in records])
        answers = torch.tensor([tok(r.meta["answer"], add_special_tokens=False)["input_ids"] + [data.eos]
                                for r in records])
        logits = model(input_ids=torch.cat([prompts, answers], dim=1)).logits[:, prompts.shape[1] - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, answers.unsqueeze(-1)).squeeze(-1).sum(-1)
        greedy = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=world.length + 1)[:, prompts.shape[1]:]
        exact = [tok.decode(row, skip_special_tokens=True) == r.meta["answer"] for row, r in zip(greedy, records)]
        out[str(d)] = {"n": len(records), "greedy": float(np.mean(exact)),
                       "expected": float(torch.exp(logp).mean())}
    model.train()
    return out


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    tokenizer = char_tokenizer()
    world = CipherWorld({"letters": args.letters, "length": args.length, "key_seed": 0})
    data = NoisyCipherData(tokenizer, world, args.copy_prob)
    model = build_model(tokenizer, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0xC1]))
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, horizon=args.steps)
        ids, targets, start = data.batch(rng, args.batch_size)
        logits = model(input_ids=ids).logits[:, start - 1:-1]  # the positions that predict the answer and its eos
        loss = -(targets * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"step {step + 1} loss {np.mean(losses[-args.log_every:]):.4f} {time.perf_counter() - t0:.0f}s",
                  flush=True)
    train_s = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    evaluation = evaluate(model, data, world, args.eval_per_level) if args.eval_per_level else {}
    log = {"args": vars(args), "train_s": train_s, "params": sum(p.numel() for p in model.parameters()),
           "final_loss": float(np.mean(losses[-100:])), "losses": losses[:: max(1, args.steps // 200)],
           "eval": evaluation}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> None:
    log = train(parse_args(argv))
    print(f"{log['params']} params, {log['train_s']:.0f}s, final loss {log['final_loss']:.4f}")
    print("d    n  greedy  expected (teacher-forced pi(answer))")
    for d, row in log["eval"].items():
        print(f"{d}  {row['n']:4d}  {row['greedy']:.3f}   {row['expected']:.2e}")


if __name__ == "__main__":
    main()
