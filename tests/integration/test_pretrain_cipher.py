"""scripts/pretrain_cipher.py: the noisy task's targets, and a deterministic, loadable solver."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_cipher", REPO / "scripts" / "pretrain_cipher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_marked_positions_copy_with_p_0_3_and_spread_the_rest_over_other_letters(script):
    from eva_ray.tiny import char_tokenizer
    from eva_ray.worlds.cipher import CipherWorld

    tok = char_tokenizer()
    world = CipherWorld({"key_seed": 0})
    data = script.NoisyCipherData(tok, world, copy_prob=0.3)
    ids, targets, start = data.batch(np.random.default_rng(0), 64)
    assert torch.allclose(targets.sum(-1), torch.ones(64, world.length + 1))
    letter_ids = [tok.convert_tokens_to_ids(c) for c in world.alphabet]
    for b in range(64):
        prompt = tok.decode(ids[b, :start].tolist(), skip_special_tokens=True)
        for i, c in enumerate(prompt):
            row = targets[b, i, letter_ids]
            x = world.alphabet.index(c.lower())
            if c.isupper():  # marked: 0.3 on the input letter, 0.7 / 9 on each other one, f(x) included
                assert row[x] == pytest.approx(0.3) and row.sum() == pytest.approx(1.0)
                assert row[world.key[x]] == pytest.approx(0.7 / 9)
            else:
                assert row[x] == 1.0
        assert targets[b, world.length, tok.eos_token_id] == 1.0


def test_pretraining_is_deterministic_and_loads(script, tmp_path):
    from transformers import AutoModelForCausalLM

    common = ["--steps", "8", "--batch-size", "16", "--eval-per-level", "3", "--log-every", "0"]
    a = script.train(script.parse_args([*common, "--out", str(tmp_path / "a")]))
    script.train(script.parse_args([*common, "--out", str(tmp_path / "b")]))
    ma = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    mb = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert set(a["eval"]) == {str(d) for d in range(1, 7)} and all(r["greedy"] == 0.0 for r in a["eval"].values())
