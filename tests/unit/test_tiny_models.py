"""The tiny models tests run on load back through the ordinary from_pretrained path."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from eva_ray.tiny import END, save_tiny_models


def test_tiny_models_round_trip_and_chat_template(tmp_path):
    paths = save_tiny_models(tmp_path)
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    assert tok.padding_side == "left" and tok.eos_token == END
    text = tok.apply_chat_template([{"role": "user", "content": "12+3="}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|user|>12+3=<|end|><|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 8  # 3 special tokens + 5 characters
    assert tok.decode(ids, skip_special_tokens=True) == "12+3="
    assert tok.decode(tok("a b\nc", add_special_tokens=False)["input_ids"]) == "a b\nc"

    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    enc = tok([text, "hi"], return_tensors="pt", padding=True, add_special_tokens=False)
    out = policy.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)

    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    with torch.no_grad():
        scores = reward(**tok(["a", "bb"], return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_tiny_scheme_builds_once_and_passes_other_paths_through(tmp_path, monkeypatch):
    from eva_ray.tiny import resolve_model_path

    monkeypatch.setenv("EVA_RAY_CACHE", str(tmp_path))
    policy = resolve_model_path("tiny:policy")
    assert (tmp_path / "tiny" / "v2-seed0" / "policy" / "config.json").is_file() and policy.endswith("policy")
    stamp = (tmp_path / "tiny" / "v2-seed0" / "policy" / "config.json").stat().st_mtime_ns
    assert resolve_model_path("tiny:policy") == policy  # cached: not rebuilt
    assert (tmp_path / "tiny" / "v2-seed0" / "policy" / "config.json").stat().st_mtime_ns == stamp
    assert resolve_model_path("tiny:reward").endswith("reward")
    assert resolve_model_path("/models/gemma") == "/models/gemma" and resolve_model_path(None) is None
    import pytest

    with pytest.raises(ValueError, match="a tiny model is one of"):
        resolve_model_path("tiny:oracle")
