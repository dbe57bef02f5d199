"""GPU check: the learner's ZeRO-3 step, the HF rollout backend with the static cache, and a weight sync, timed.

It uses the project's own classes in this one process, without Ray: ``actors.learner.Learner`` (a real DeepSpeed
engine), ``actors.rollout.RolloutWorker`` (backend ``hf``) and the weight channel, driven through
``launch.weight_sync.connect`` / ``sync`` with each object wrapped in ``launch.handles.InlineActor`` (the
``@collective`` methods then run on their own threads, so learner and worker meet in one process).

The model is Qwen2-0.5B-shaped: ``configs/models/qwen2-0.5b-shape/config.json`` with random weights
(``AutoModelForCausalLM.from_config``), the full 151,936-token vocabulary (the logits are part of what is
measured), saved with the repository's character tokenizer (``eva_ray.tiny.char_tokenizer``; its ids are all far
below the vocabulary size) to a temporary folder, so the real loaders read it. bf16 on a GPU, float32 on the CPU.
``--tiny`` scales the same architecture down for a CPU smoke run of a few seconds.

Parts, in this order (``--budget-s`` skips what no longer fits, with a message; a watchdog ends the script with
whatever it measured if a part hangs past the budget):

1. rollout: one ``RolloutWorker`` (static KV cache on a GPU), a warm-up call (on a GPU it compiles, about a minute),
   then timed calls of 64 prompts x 1 response x 128 new tokens (``--tiny``: 8 x 1 x 16): tokens/s;
2. learner: ZeRO-3 ``train_step`` (RLOO, beta 0 so no reference model unless ``--beta``), 4 prompts x 2 responses
   x 1,024 tokens (128 prompt + 896 response) = 8,192 tokens in one micro-batch of 8; after ``--warmup-steps`` the
   median of ``--steps`` steps, MFU = 6 * params * tokens / step time / ``--peak-tflops`` (989 TFLOP/s, the
   H200's dense bf16 peak). The learner's step also runs a no-grad forward over the batch (its loss check), which
   6NT does not count; ``mfu_all_passes`` counts it (8NT, 10NT with a reference);
3. sync: the weight channel between the learner and the worker, ``--syncs`` pushes of the whole policy, then a
   check that the worker's weights equal the learner's. The channel uses gloo, not NCCL: two NCCL ranks cannot
   share one GPU ("Duplicate GPU detected"), so on one GPU this measures the GPU -> CPU -> gloo -> CPU -> GPU path,
   a lower bound for the NCCL path between GPUs.

Output: one line per figure, then one JSON line with every figure (also written to ``--json`` if given).

Running it on the device machine (torch and transformers there, no network, no Ray, no vLLM)
---------------------------------------------------------------------------------------------

``scripts/gpu_check.md`` has the steps: build the deepspeed wheel here with ``pip wheel deepspeed==0.19.8 --no-deps``,
download the other wheels for cp312, carry ``.whl``, install them with ``--target`` and run::

    python3 scripts/gpu_check.py --json $OUT/gpu_check.json

On the CPU::

    python scripts/gpu_check.py --tiny
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

SHAPE_CONFIG = REPO / "configs" / "models" / "qwen2-0.5b-shape" / "config.json"
# The same architecture (Qwen2: grouped-query attention, QKV bias, tied embeddings), a few thousand times smaller.
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 32, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 2048}
# Seconds a part needs on a GPU at the full shape, at least, for it to be started (the static cache's compile
# dominates the rollout). On the CPU and with --tiny every part is started while any budget is left.
GPU_PART_SECONDS = {"rollout": 150.0, "learner": 60.0, "sync": 30.0, "softcap": 60.0, "nccl": 40.0}
PARTS = ("rollout", "learner", "sync", "softcap", "nccl")
GPU_ONLY_PARTS = ("nccl",)
GEMMA2_CONFIG = REPO / "configs" / "models" / "gemma-2-9b-it" / "config.json"
# Gemma-2-9B's layer (hidden 3584, 16 heads of 256, 8 KV heads, its vocabulary), two layers deep; the attention cap is
# lowered from 50 to 1 so that a kernel ignoring it shows at random initialisation.
GEMMA2_CHECK = {"num_hidden_layers": 2, "attn_logit_softcapping": 1.0, "initializer_range": 0.1}
GEMMA2_TINY = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
               "intermediate_size": 128, "vocab_size": 256, "query_pre_attn_scalar": 32, "initializer_range": 0.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape and batches: a CPU smoke run of a few seconds")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip parts that no longer fit in this many seconds from the start (default 420)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak for MFU, TFLOP/s (default 989: H200 dense bf16)")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all; {','.join(GPU_ONLY_PARTS)} only "
                        "on a GPU)")
    p.add_argument("--nccl-probe", choices=("untimed", "timed"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3))
    p.add_argument("--beta", type=float, default=0.0, help="RLOO KL coefficient (> 0 adds a reference model)")
    p.add_argument("--prompts", type=int, default=None, help="learner batch: prompts (default 4)")
    p.add_argument("--responses", type=int, default=None, help="learner batch: responses per prompt (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="learner batch: tokens per sequence (default 1024)")
    p.add_argument("--prompt-len", type=int, default=None, help="learner batch: prompt tokens of each (default 128)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed learner steps (median reported)")
    p.add_argument("--rollout-prompts", type=int, default=None, help="default 64 (--tiny: 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--tiny: 16)")
    p.add_argument("--rollout-prompt-chars", type=int, default=None,
                   help="characters per rollout prompt, one token each (default 64; --tiny: 12)")
    p.add_argument("--rollout-calls", type=int, default=2, help="timed rollout calls after the warm-up")
    p.add_argument("--static-cache", default="auto", choices=("auto", "on", "off"),
                   help="auto: on for a GPU, off on the CPU (where it only compiles slowly)")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="weight-channel bucket size, MiB")
    p.add_argument("--syncs", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the final JSON object to this file")
    args = p.parse_args(argv)
    if args.parts is None:
        import torch

        on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.parts = ",".join(p for p in PARTS if on_gpu or p not in GPU_ONLY_PARTS)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {list(PARTS)}")
    small = args.tiny
    defaults = {"prompts": 4, "responses": 2, "seq_len": 128 if small else 1024, "prompt_len": 16 if small else 128,
                "rollout_prompts": 8 if small else 64, "new_tokens": 16 if small else 128,
                "rollout_prompt_chars": 12 if small else 64}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.responses < 2:
        p.error("--responses: RLOO needs at least 2 responses per prompt")
    if not 0 < args.prompt_len < args.seq_len:
        p.error("--prompt-len must be between 1 and --seq-len - 1")
    return args


# ----------------------------------------------------------------------------------------------------- helpers


class Report:
    """Collects the figures, prints each as it comes, and prints the JSON line once (also from the watchdog)."""

    def __init__(self, json_path: str | None) -> None:
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {"skipped": [], "errors": {}}
        self.json_path = json_path
        self._lock = threading.Lock()
        self._done = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def set(self, **values: Any) -> None:
        self.results.update(values)

    def finish(self, status: str) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            self.results.update(status=status, elapsed_s=round(self.elapsed(), 2))
            text = json.dumps(self.results, sort_keys=True)
            if self.json_path:
                Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(self.json_path).write_text(text + "\n")
            print(text, flush=True)


def sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (a tiny CPU figure must not round to 0)."""
    return float(f"{value:.{digits}g}")


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def build_model(folder: Path, *, tiny: bool, dtype: Any) -> tuple[int, dict[str, Any]]:
    """Write a random Qwen2-0.5B-shaped (or tiny) model and the char tokenizer to ``folder``; returns its size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from eva_ray.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    fields = json.loads(SHAPE_CONFIG.read_text())
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    if tiny:
        fields.update(TINY_SHAPE)
    if len(tokenizer) > fields["vocab_size"]:
        raise ValueError(f"the tokenizer's {len(tokenizer)} ids do not fit the vocabulary of {fields['vocab_size']}")
    # The tokenizer's special ids; the vocabulary keeps its size (ids the tokenizer never makes stay trainable).
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())  # tied embedding counted once: it is also the LM head
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shape = {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                              "num_key_value_heads", "intermediate_size", "vocab_size")}
    del model
    return params, shape


def train_batch(args: argparse.Namespace, vocab: int, pad_id: int) -> Any:
    """4 prompts x 2 responses of fixed lengths (no padding), random ids, rewards with spread (never skipped)."""
    import torch

    from eva_ray.batching import collate
    from eva_ray.rollouts import Rollout

    g = torch.Generator().manual_seed(0)
    low = 8  # above the tokenizer's special ids

    def ids(n: int) -> list[int]:
        return torch.randint(low, vocab, (n,), generator=g).tolist()

    response_len = args.seq_len - args.prompt_len
    groups = []
    for p in range(args.prompts):
        prompt = ids(args.prompt_len)
        groups.append([Rollout(f"p{p}", prompt, ids(response_len), "", "length", 0)
                       for _ in range(args.responses)])
    rewards = torch.randn(args.prompts, args.responses, generator=g)
    return collate(groups, rewards, pad_token_id=pad_id)


def budget_left(report: Report, args: argparse.Namespace, part: str, on_gpu_full: bool) -> bool:
    left = args.budget_s - report.elapsed()
    need = GPU_PART_SECONDS[part] if on_gpu_full else 0.0
    if left <= 0 or left < need:
        report.line(f"{part}: SKIPPED, {max(left, 0):.0f}s of the {args.budget_s:.0f}s budget left "
                    f"(needs about {need:.0f}s)")
        report.results["skipped"].append(part)
        return False
    return True


# ------------------------------------------------------------------------------------------------------- parts


def run_rollout(args: argparse.Namespace, report: Report, worker: Any, static: bool) -> None:
    from eva_ray.records import PromptRecord

    letters = "abcdefghijklmnopqrstuvwxyz"
    # Every prompt the same length, so the batch has no padding and each call has the shapes the warm-up compiled.
    chars = args.rollout_prompt_chars
    prompts = [PromptRecord(id=f"r{i}", text="".join(letters[(i * 7 + j) % 26] for j in range(chars)))
               for i in range(args.rollout_prompts)]

    def call() -> tuple[float, int, int]:
        synchronize(worker_device(worker))
        t0 = time.perf_counter()
        groups = worker.generate(prompts, 1)
        synchronize(worker_device(worker))
        elapsed = time.perf_counter() - t0
        lengths = [len(r.response_token_ids) for g in groups for r in g]
        return elapsed, sum(lengths), max(lengths)

    warm_s, _, _ = call()
    report.line(f"rollout: warm-up call {warm_s:.2f}s (static cache {'on: includes its compile' if static else 'off'})")
    timed = [call() for _ in range(args.rollout_calls)]
    median_s = statistics.median(t for t, _, _ in timed)
    tokens = statistics.median(n for _, n, _ in timed)
    steps = statistics.median(m for _, _, m in timed)
    tokens_per_s = tokens / median_s
    report.set(rollout_tokens_per_s=sig(tokens_per_s), rollout_call_s=sig(median_s),
               rollout_warmup_s=sig(warm_s), rollout_decode_steps_per_s=round(steps / median_s, 1),
               rollout_batch=f"{args.rollout_prompts} prompts x 1 response x {args.new_tokens} new tokens",
               rollout_prompt_tokens=len(worker._prompt_ids(prompts[0])), rollout_static_cache=static)
    report.line(f"rollout: {tokens_per_s:,.0f} tokens/s ({args.rollout_prompts} prompts x {args.new_tokens} new "
                f"tokens, {tokens:.0f} generated in {median_s:.3f}s, {steps / median_s:.1f} decode steps/s; "
                f"median of {args.rollout_calls} calls)")


def worker_device(worker: Any) -> Any:
    return worker._engine.device


def run_learner(args: argparse.Namespace, report: Report, learner: Any, params: int, vocab: int, pad_id: int) -> None:
    import torch

    batch = train_batch(args, vocab, pad_id)
    tokens = batch.num_sequences * args.seq_len
    device = learner.device
    times, metrics = [], {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup_steps + args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        metrics = learner.train_step(batch)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        if metrics["train/skipped"]:
            raise RuntimeError(f"learner step {i} was skipped: {metrics}")
        if i >= args.warmup_steps:
            times.append(elapsed)
        else:
            report.line(f"learner: warm-up step {i} {elapsed:.3f}s")
        if report.elapsed() > args.budget_s and len(times) >= 1:
            report.line(f"learner: budget reached after {len(times)} timed step(s)")
            break
    step_s = statistics.median(times)
    flops = 6 * params * tokens
    passes = 8 + (2 if args.beta > 0 else 0)  # + the no-grad forward (loss check) + the reference forward
    mfu = flops / step_s / (args.peak_tflops * 1e12)
    report.set(learner_step_s=sig(step_s), learner_steps_s=[sig(t) for t in times],
               learner_tokens_per_step=tokens, learner_tokens_per_s=round(tokens / step_s, 1),
               learner_tflops=sig(flops / step_s / 1e12), mfu=sig(mfu),
               mfu_all_passes=sig(passes * params * tokens / step_s / (args.peak_tflops * 1e12)),
               peak_tflops=args.peak_tflops, zero_stage=args.zero_stage, beta=args.beta,
               learner_batch=(f"{args.prompts} prompts x {args.responses} responses x {args.seq_len} tokens "
                              f"({args.prompt_len} prompt + {args.seq_len - args.prompt_len} response), micro-batch "
                              f"{args.micro_batch}"),
               learner_loss=metrics.get("train/loss"), learner_grad_norm=metrics.get("train/grad_norm"))
    if device.type == "cuda":
        report.set(learner_peak_memory_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2))
    report.line(f"learner: step {step_s:.3f}s (ZeRO-{args.zero_stage}, median of {len(times)}; "
                f"{args.prompts} prompts x {args.responses} responses x {args.seq_len} tokens = {tokens} tokens), "
                f"{tokens / step_s:,.0f} tokens/s")
    counted = "the loss-check forward" + (" and the reference" if args.beta > 0 else "")
    report.line(f"learner: MFU {mfu * 100:.3g}% (6 x {params / 1e6:.1f}M params x {tokens} tokens / step / "
                f"{args.peak_tflops:g} TFLOP/s = {flops / step_s / 1e12:.1f} TFLOP/s achieved; counting "
                f"{counted}: {report.results['mfu_all_passes'] * 100:.3g}%)"
                + (f"; peak memory {report.results['learner_peak_memory_gb']} GB"
                   if "learner_peak_memory_gb" in report.results else ""))


def run_sync(args: argparse.Namespace, report: Report, learner: Any, worker: Any) -> None:
    import torch

    from launch.handles import InlineActor
    from launch.weight_sync import connect, sync

    timeout = max(60.0, min(300.0, args.budget_s - report.elapsed() + 60.0))
    learner_h, worker_h = InlineActor(learner, "learner"), InlineActor(worker, "rollout-0")
    t0 = time.perf_counter()
    connect(learner_h, [worker_h], "127.0.0.1", bucket_bytes=int(args.bucket_mb * (1 << 20)), timeout_s=timeout,
            backend="gloo")
    report.line(f"sync: channel joined in {time.perf_counter() - t0:.2f}s (backend gloo: two NCCL ranks cannot "
                "share one GPU, so this is the GPU -> CPU -> GPU path)")
    walls, stats = [], {}
    for i in range(args.syncs):
        t0 = time.perf_counter()
        stats = sync(learner_h, [worker_h], learner.version, timeout)
        synchronize(learner.device)  # the worker's last host-to-device copies too (one device)
        walls.append(time.perf_counter() - t0)
        if report.elapsed() > args.budget_s:
            report.line(f"sync: budget reached after {i + 1} sync(s)")
            break
    wall = statistics.median(walls)
    gb = stats["bytes"] / 1e9
    # The check: every tensor the worker holds equals the learner's (same dtype, so bit for bit).
    _, state = learner.get_weights()
    held = worker._engine.model.state_dict()
    mismatched = [name for name, tensor in state.items() if not torch.equal(held[name].cpu(), tensor)]
    report.set(sync_s=sig(wall), sync_gb_per_s=sig(gb / wall), sync_bytes=int(stats["bytes"]),
               sync_buckets=int(stats["buckets"]), sync_send_s=sig(stats["seconds"]),
               sync_walls_s=[sig(w) for w in walls], sync_backend="gloo", sync_version=int(stats["version"]),
               sync_weights_match=not mismatched)
    report.line(f"sync: {wall:.3f}s per sync, {gb / wall:.2f} GB/s ({gb:.3f} GB in {int(stats['buckets'])} buckets of "
                f"{args.bucket_mb:g} MiB, median of {len(walls)}; gloo)")
    report.line(f"sync: worker weights equal the learner's: {not mismatched}"
                + (f" (differ: {mismatched[:5]})" if mismatched else ""))
    if mismatched:
        raise RuntimeError(f"after the sync {len(mismatched)} tensors differ, e.g. {mismatched[:5]}")


def build_gemma2(folder: Path, *, tiny: bool, dtype: Any) -> dict[str, Any]:
    """A random Gemma-2-shaped model (GEMMA2_CHECK: two of Gemma-2-9B's layers, attention cap 1) and the char
    tokenizer, written to ``folder``; returns its config fields."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from eva_ray.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    fields = json.loads(GEMMA2_CONFIG.read_text())
    for key in ("architectures", "torch_dtype"):
        fields.pop(key, None)
    fields.update(GEMMA2_CHECK)
    if tiny:
        fields.update(GEMMA2_TINY)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return fields


def run_softcap(args: argparse.Namespace, report: Report, folder: Path, device: Any, dtype_name: str) -> None:
    """The learner's Gemma-2 attention against eager (and against SDPA, where this transformers offers it), then
    one ZeRO-3 learner step on the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.learner import _load_causal_lm

    dtype = getattr(torch, dtype_name)
    path = folder / "gemma2"
    fields = build_gemma2(path, tiny=args.tiny, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    seq = min(args.seq_len, 1024)
    ids = torch.randint(8, fields["vocab_size"], (2, seq), generator=g).to(device)

    def logprobs(model: Any) -> torch.Tensor:
        with torch.no_grad():
            logits = model.to(device).eval()(input_ids=ids, use_cache=False).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)

    learner_model = _load_causal_lm(str(path), dtype, trust_remote_code=False)
    chosen = learner_model.config._attn_implementation
    got = logprobs(learner_model)
    del learner_model
    eager = logprobs(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager"))
    diff = float((got - eager).abs().max())
    try:
        sdpa = logprobs(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa"))
        sdpa_diff: Any = sig(float((sdpa - eager).abs().max()))
    except (ValueError, ImportError) as exc:  # newer transformers refuse SDPA for a soft-capped model
        sdpa_diff = f"refused: {str(exc).splitlines()[0][:120]}"
    report.set(softcap_attn_implementation=chosen, softcap_learner_vs_eager_max_abs=sig(diff),
               softcap_sdpa_vs_eager_max_abs=sdpa_diff, softcap_tokens=int(ids[:, 1:].numel()))
    report.line(f"softcap: the learner loads Gemma-2 with {chosen!r}; its log-probs differ from eager by {diff:.3g} "
                f"(SDPA would differ by {sdpa_diff}) over {ids[:, 1:].numel()} tokens")
    if chosen != "eager" or diff > 0:
        raise RuntimeError(f"the learner's Gemma-2 attention is {chosen!r}, {diff:.3g} from eager")

    from actors.learner import Learner
    from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig

    learner = Learner(str(path), solver=SolverConfig(algorithm="rloo", beta=0.0, n_responses=args.responses),
                      learner=LearnerConfig(zero_stage=3, lr=1e-6, lr_schedule="constant", warmup_ratio=0.0,
                                            micro_batch_size=args.micro_batch, gradient_checkpointing=True),
                      model=ModelConfig(dtype=dtype_name), total_steps=2, seed=0, device=str(device))
    try:
        small = argparse.Namespace(**{**vars(args), "seq_len": seq, "prompt_len": min(args.prompt_len, seq // 2)})
        batch = train_batch(small, fields["vocab_size"], pad_id=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        t0 = time.perf_counter()
        metrics = learner.train_step(batch)
        synchronize(device)
        step_s = time.perf_counter() - t0
    finally:
        learner.close()
    if metrics["train/skipped"] or not math.isfinite(metrics.get("train/loss", math.nan)):
        raise RuntimeError(f"the ZeRO-3 step on the Gemma-2-shaped model did not apply: {metrics}")
    report.set(softcap_zero3_step_s=sig(step_s), softcap_zero3_loss=metrics["train/loss"])
    if device.type == "cuda":
        report.set(softcap_zero3_peak_memory_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2))
    report.line(f"softcap: ZeRO-3 step with eager attention and gradient checkpointing {step_s:.2f}s, loss "
                f"{metrics['train/loss']:.4f}")


def nccl_probe(kind: str) -> dict[str, Any]:
    """One process, one GPU, a world of one: what a wait on an NCCL collective stuck behind a 10 s kernel does.

    ``untimed``: torch's default group and ``wait()`` as the channel called it before: returns while the collective
    is still pending. ``timed``: the channel's group (``nccl_group``) and ``wait(timeout)``: raises after the
    timeout, and the process is still alive once the group's own watchdog timeout has passed too.
    """
    import datetime

    import torch
    import torch.distributed as dist

    from actors.weight_channel import nccl_group

    timeout = datetime.timedelta(seconds=2)
    store = dist.PrefixStore(f"probe-{kind}", dist.HashStore())
    if kind == "timed":
        pg = nccl_group(store, 0, 1, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        pg = dist.ProcessGroupNCCL(store, 0, 1, options)
    tensor = torch.zeros(1, device="cuda")
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait(datetime.timedelta(seconds=60))  # builds the communicator
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e10))  # about 10 s of GPU time ahead of the collective on the same stream
    work = pg.broadcast([tensor], opts)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"kind": kind}
    try:
        work.wait() if kind == "untimed" else work.wait(timeout)
        out.update(raised=False)
    except Exception as exc:  # noqa: BLE001 - what it raises is the result
        out.update(raised=True, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    out.update(wait_s=round(time.perf_counter() - t0, 3), completed_at_return=bool(work.is_completed()))
    if kind == "timed":
        pg.abort()
    torch.cuda.synchronize()
    time.sleep(4)  # past the group's own 2 s watchdog timeout: a teardown would have ended the process by now
    out["alive_after_watchdog"] = True
    return out


def run_nccl(report: Report) -> None:
    import subprocess

    results = {}
    for kind in ("untimed", "timed"):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--nccl-probe", kind],
                              capture_output=True, text=True, timeout=180)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results[kind] = json.loads(lines[-1]) if lines else {
            "kind": kind, "exit_code": proc.returncode, "alive_after_watchdog": False,
            "stderr_tail": proc.stderr[-400:]}
    untimed, timed = results["untimed"], results["timed"]
    report.set(nccl_untimed=untimed, nccl_timed=timed)
    report.line(f"nccl: untimed wait returned after {untimed.get('wait_s')}s with the collective "
                f"{'done' if untimed.get('completed_at_return') else 'still pending'} (torch's default group)")
    report.line(f"nccl: the channel's wait raised after {timed.get('wait_s')}s: {timed.get('error')}; process alive "
                f"after the watchdog's timeout: {timed.get('alive_after_watchdog')}")
    if not (timed.get("raised") and timed.get("alive_after_watchdog") and timed.get("wait_s", 99) < 8):
        raise RuntimeError(f"the channel's NCCL group did not raise in time and survive: {timed}")


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nccl_probe:  # a child process of the nccl part
        print(json.dumps(nccl_probe(args.nccl_probe)), flush=True)
        return 0
    report = Report(args.json)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    # A hang (a collective waiting on a peer, a compile that never ends) still prints what was measured.
    faulthandler.dump_traceback_later(args.budget_s + 45, exit=False)

    def watchdog() -> None:
        report.line(f"WATCHDOG: {args.budget_s + 60:.0f}s passed; ending with what was measured")
        report.finish("watchdog")
        os._exit(3)

    timer = threading.Timer(args.budget_s + 60, watchdog)
    timer.daemon = True
    timer.start()

    import warnings

    import torch
    import transformers

    # Progress bars of every save and load, and DeepSpeed's deprecated-collective warnings, would bury the figures.
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    static = args.static_cache == "on" or (args.static_cache == "auto" and device.type == "cuda")
    on_gpu_full = device.type == "cuda" and not args.tiny
    report.set(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               dtype=dtype_name, shape="tiny" if args.tiny else "qwen2-0.5b", versions=versions(), parts=parts)
    report.line(f"gpu_check on {report.results['gpu'] or 'CPU'}, {dtype_name}, "
                f"{'tiny shape' if args.tiny else 'Qwen2-0.5B shape'}; budget {args.budget_s:.0f}s; "
                f"{', '.join(f'{k} {v}' for k, v in report.results['versions'].items())}")

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    learner = worker = None
    status = "ok"
    try:
        t0 = time.perf_counter()
        params, shape = build_model(folder / "policy", tiny=args.tiny, dtype=dtype)
        path = str(folder / "policy")
        report.set(params=params, model_shape=shape)
        report.line(f"model: {params / 1e6:.1f}M parameters {shape}, random weights, written in "
                    f"{time.perf_counter() - t0:.1f}s")

        from actors.rollout import RolloutWorker

        need_worker = "rollout" in parts or "sync" in parts
        if need_worker and (budget_left(report, args, "rollout", on_gpu_full and static and "rollout" in parts)):
            t0 = time.perf_counter()
            worker = RolloutWorker(path, backend="hf", dtype=dtype_name, temperature=1.0,
                                   max_new_tokens=args.new_tokens, max_prompt_tokens=args.rollout_prompt_chars + 8,
                                   seed=0, device=str(device), static_cache=static)
            report.line(f"rollout: worker loaded in {time.perf_counter() - t0:.1f}s")
            if "rollout" in parts:
                try:
                    run_rollout(args, report, worker, static)
                except Exception as exc:  # the other parts still run; the error is in the JSON
                    status = "error"
                    report.results["errors"]["rollout"] = f"{type(exc).__name__}: {exc}"
                    report.line(f"rollout: FAILED: {type(exc).__name__}: {exc}")

        if ("learner" in parts or "sync" in parts) and budget_left(report, args, "learner", on_gpu_full):
            from actors.learner import Learner
            from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig

            t0 = time.perf_counter()
            learner = Learner(path, solver=SolverConfig(algorithm="rloo", beta=args.beta, n_responses=args.responses),
                              learner=LearnerConfig(zero_stage=args.zero_stage, lr=1e-6, lr_schedule="constant",
                                                    warmup_ratio=0.0, micro_batch_size=args.micro_batch,
                                                    gradient_checkpointing=args.gradient_checkpointing),
                              model=ModelConfig(dtype=dtype_name), total_steps=args.warmup_steps + args.steps,
                              seed=0, device=str(device))
            report.line(f"learner: ZeRO-{args.zero_stage} engine built in {time.perf_counter() - t0:.1f}s")
            if "learner" in parts:
                try:
                    run_learner(args, report, learner, params, shape["vocab_size"], pad_id=0)
                except Exception as exc:
                    status = "error"
                    report.results["errors"]["learner"] = f"{type(exc).__name__}: {exc}"
                    report.line(f"learner: FAILED: {type(exc).__name__}: {exc}")
        elif "learner" in parts and "learner" not in report.results["skipped"]:
            report.results["skipped"].append("learner")

        if "sync" in parts:
            if learner is None or worker is None:
                report.line("sync: SKIPPED, it needs both the learner and the worker")
                report.results["skipped"].append("sync")
            elif budget_left(report, args, "sync", on_gpu_full):
                try:
                    run_sync(args, report, learner, worker)
                except Exception as exc:
                    status = "error"
                    report.results["errors"]["sync"] = f"{type(exc).__name__}: {exc}"
                    report.line(f"sync: FAILED: {type(exc).__name__}: {exc}")
        # The remaining parts build models of their own: the Qwen-shaped learner and worker go first.
        for owned in (worker, learner):
            if owned is not None:
                owned.close()
        worker = learner = None
        for part, run_part in (("softcap", lambda: run_softcap(args, report, folder, device, dtype_name)),
                               ("nccl", lambda: run_nccl(report))):
            if part not in parts:
                continue
            if part in GPU_ONLY_PARTS and device.type != "cuda":
                report.line(f"{part}: SKIPPED, it needs a GPU")
                report.results["skipped"].append(part)
            elif budget_left(report, args, part, on_gpu_full):
                try:
                    run_part()
                except Exception as exc:  # the other parts still run; the error is in the JSON
                    status = "error"
                    report.results["errors"][part] = f"{type(exc).__name__}: {exc}"
                    report.line(f"{part}: FAILED: {type(exc).__name__}: {exc}")

    except BaseException as exc:
        status = "error"
        report.results["errors"]["setup"] = f"{type(exc).__name__}: {exc}"
        report.line(f"FAILED: {type(exc).__name__}: {exc}")
        if not isinstance(exc, Exception):
            raise
    finally:
        for owned in (worker, learner):
            if owned is not None:
                try:
                    owned.close()
                except Exception as exc:  # closing must not hide the figures
                    report.line(f"closing {type(owned).__name__}: {type(exc).__name__}: {exc}")
        shutil.rmtree(folder, ignore_errors=True)
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
        if report.results["skipped"] and status == "ok":
            status = "partial"
        report.finish(status)
    return 0 if status in ("ok", "partial") else 1


if __name__ == "__main__":
    sys.exit(main())
