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
