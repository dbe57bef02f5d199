"""The work `scripts/bench_peer.py` gives both TRL's RLOOTrainer and eva-ray, defined once so the two cannot drift.

One step: 8 prompts x 4 samples x 32 new tokens from a 2-layer Llama (hidden 128, FFN 256, the character-level
tokenizer of :mod:`eva_ray.tiny`), reward = the number of digits in the response, RLOO with the KL (k1, coefficient
0.05) subtracted from the reward, AdamW at a constant 1e-4, fp32 on CPU, no creator (``evolve.method=none``), no
evaluation, no logging sinks. Both systems load the model from the same folder with ``from_pretrained``.

    from eva_ray import peer_work
    model_dir = peer_work.build_model("/tmp/peer/model")
    data = peer_work.write_prompts("/tmp/peer/prompts.jsonl")
    config = peer_work.write_eva_config("/tmp/peer/eva.yaml", model_dir, data, steps=40, output_dir="/tmp/peer/runs")
    # eva-ray run --config /tmp/peer/eva.yaml
    kwargs = peer_work.trl_config_kwargs("/tmp/peer/trl", steps=40)   # for trl.RLOOConfig(**kwargs)

Nothing here imports torch, transformers or trl at import time (the core's import test walks every module).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

# The shape and the algorithm's knobs, shared by both systems.
LAYERS = 2
HIDDEN = 128
FFN = 256
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 32
LR = 1e-4
BETA = 0.05
TEMPERATURE = 1.0
N_PROMPTS = 512
MODEL_SEED = 0
PROMPT_SEED = 0
REWARD_FUNCTION = "eva_ray.peer_work:digit_reward"

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "window", "orange", "forest",
          "candle", "bridge", "rocket", "violin", "harbor", "marble", "planet", "shadow", "winter")
_TEMPLATES = ("Count the {a}s near the {b}.", "How many {a}s fit in a {b}?", "Name a number for the {a} and the {b}.",
              "List some {a}s, then a {b}.", "Describe the {a} by the {b}.", "What is the {a} of {n} {b}s?",
              "Write the code of {a} {n}.", "Add {n} {a}s to the {b}.")


def prompts(n: int = N_PROMPTS, seed: int = PROMPT_SEED) -> list[str]:
    """``n`` distinct short printable prompts, the same for a given seed (a private RNG: no global state touched)."""
    # Templates x word pairs alone give this many distinct texts, so the loop below always ends.
    if n > len(_TEMPLATES) * len(_WORDS) ** 2:
        raise ValueError(f"{n} prompts asked for; at most {len(_TEMPLATES) * len(_WORDS) ** 2} are guaranteed")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = rng.choice(_TEMPLATES).format(a=rng.choice(_WORDS), b=rng.choice(_WORDS), n=rng.randint(2, 99))
        if text not in seen:  # eva-ray's loader drops duplicates; TRL would keep them: keep the sets identical
            seen.add(text)
            out.append(text)
    return out


def write_prompts(path: str | Path, n: int = N_PROMPTS, seed: int = PROMPT_SEED) -> str:
    """The prompt set as the JSONL seed file eva-ray reads (``data.path``, ``data.id_field=id``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(prompts(n, seed)):
            fh.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")
    return str(path)


def read_prompts(path: str | Path) -> list[str]:
    """The prompt texts of a file :func:`write_prompts` wrote, in order (what the TRL arm trains on)."""
    return [json.loads(line)["prompt"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_model(folder: str | Path, seed: int = MODEL_SEED) -> str:
    """Write the policy (random weights from ``seed``) and its tokenizer to ``folder``; return the folder.

    Saved and loaded back with ``from_pretrained`` by both systems, exactly like :mod:`eva_ray.tiny`'s models.
    """
    from eva_ray.tiny import char_tokenizer, tiny_policy

    folder = Path(folder)
    tokenizer = char_tokenizer()
    model = tiny_policy(tokenizer, seed=seed, hidden=HIDDEN, layers=LAYERS, intermediate=FFN)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def count_digits(text: Any) -> float:
    if not isinstance(text, str):
        return 0.0
    return float(sum(ch.isdigit() for ch in text))


def digit_reward(prompt: Any, response: str) -> float:
    """The reward: how many digits the response holds. eva-ray's ``function`` backend calls it per response."""
    return count_digits(response)


def trl_digit_reward(completions: list, **_: Any) -> list[float]:
    """The same reward in TRL's form: one float per completion, which is a string or (chat) a list of messages."""
    out = []
    for completion in completions:
        if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
            completion = "".join(m.get("content", "") for m in completion if isinstance(m, dict))
        out.append(count_digits(completion))
    return out


def seed_epochs(steps: int, n_prompts: int = N_PROMPTS) -> int:
    """Passes over D that ``steps`` steps need: with no creator, an exhausted D would starve the run."""
    return max(1, math.ceil(steps * PROMPTS_PER_STEP / n_prompts))


def eva_config(model_dir: str, data_path: str, *, steps: int, output_dir: str,
               n_prompts: int = N_PROMPTS) -> dict[str, Any]:
    """The eva-ray config of this work, as the nested mapping a YAML config file holds (defaults fill the rest).

    A config file of its own, not overrides: without ``--config``, ``eva-ray run`` starts from the default run (the
    cipher world), whose world and settings would leak into the run.
    """
    return {
        "run": {"name": "peer", "total_steps": steps, "output_dir": output_dir},
        "model": {"path": model_dir},
        "data": {"path": data_path, "id_field": "id", "eval_size": 0},
        # No creator: with nothing evolved the buffer stays empty, so D must last the run (seed_epochs).
        "creator": {"batch_size": PROMPTS_PER_STEP, "seed_epochs": seed_epochs(steps, n_prompts), "snapshot_every": 0},
        "evolve": {"method": "none"},
        # TRL's RLOO: sequence KL (k1) subtracted from the reward, and an optimizer step on every batch.
        "solver": {"algorithm": "rloo", "n_responses": SAMPLES_PER_PROMPT, "beta": BETA, "kl_estimator": "k1",
                   "kl_mode": "reward", "skip_zero_advantage": False},
        "rollout": {"temperature": TEMPERATURE, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS},
        "reward": {"backend": "function", "function": REWARD_FUNCTION},
        # One forward/backward over all 32 sequences and plain AdamW, as TRL does with gradient_accumulation_steps=1.
        "learner": {"lr": LR, "lr_schedule": "constant", "warmup_ratio": 0.0, "zero_stage": 0,
                    "micro_batch_size": PROMPTS_PER_STEP * SAMPLES_PER_PROMPT, "checkpoint_every": 0},
        "logging": {"eval_every": 0, "wandb_mode": "disabled"},
        # Fractions, as in the default run: four actors must fit on a 2-core machine's Ray instance.
        "resources": {"rollout": {"num_cpus": 0.5}, "reward": {"num_cpus": 0.25}, "creator": {"num_cpus": 0.25},
                      "learner": {"num_cpus": 0.5}},
    }


def write_eva_config(path: str | Path, model_dir: str, data_path: str, *, steps: int, output_dir: str,
                     n_prompts: int = N_PROMPTS) -> str:
    """:func:`eva_config` as a YAML file for ``eva-ray run --config``."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = eva_config(model_dir, data_path, steps=steps, output_dir=output_dir, n_prompts=n_prompts)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


def trl_config_kwargs(output_dir: str, *, steps: int, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of ``trl.RLOOConfig`` (TRL 1.16) for the same work."""
    return dict(
        output_dir=output_dir, max_steps=steps, seed=seed, model_init_kwargs={"dtype": "float32"},
        # TRL counts completions per device: 8 prompts x 4 samples in one batch, one generation per step.
        per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES_PER_PROMPT, gradient_accumulation_steps=1,
        num_generations=SAMPLES_PER_PROMPT, max_completion_length=MAX_NEW_TOKENS, num_iterations=1,
        temperature=TEMPERATURE, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA,
        # TRL's own defaults differ from eva-ray's here: bf16 and (gradient) activation checkpointing on.
        bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True,
        # Nothing but the steps: no eval, no checkpoints, no logging sinks, no progress bar.
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
