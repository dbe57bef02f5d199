"""Solver pretraining (scripts/pretrain_solver.py) and the shipped chain_sum solver."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from eva_ray.records import PromptRecord  # noqa: E402
from eva_ray.worlds import CHECKPOINT_DIR, resolve_world_model  # noqa: E402
from eva_ray.worlds import chain_sum as w  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = CHECKPOINT_DIR / "chain_sum_solver"


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_solver", ROOT / "scripts" / "pretrain_solver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_sft_example_is_the_rollout_format_with_loss_on_the_response_only(script):
    from eva_ray.tiny import char_tokenizer

    tok = char_tokenizer()
    enc = script.Encoder(tok)
    task = w.Task(text="57-87=", answer="-30", difficulty=2, num_terms=2, rg_seed=0)
    batch = enc.batch([task, w.Task(text="1+2=", answer="3", difficulty=1, num_terms=2, rg_seed=0)])
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "57-87="}], add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False)["input_ids"]
    response = tok("-30", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = batch["input_ids"][0].tolist()
    assert row == prompt + response
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + response
    assert tok.decode(prompt) == "<|user|>57-87=<|end|><|assistant|>"
    short = batch["attention_mask"][1].tolist()
    assert short == [1] * sum(short) + [0] * (len(short) - sum(short))  # right padding
    assert batch["labels"][1].tolist()[sum(short):] == [-100] * (len(short) - sum(short))


def test_lr_schedule(script):
    lr_at = script.warmup_cosine  # the pretraining scripts' schedule (eva_ray.lr_schedule)
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=50, horizon=1000)
    assert lr_at(0, **kw) == pytest.approx(2e-5) and lr_at(49, **kw) == pytest.approx(1e-3)
    assert lr_at(1000, **kw) == pytest.approx(1e-4) and lr_at(5000, **kw) == pytest.approx(1e-4)


def test_pretraining_runs_saves_a_loadable_folder_and_is_deterministic(script, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = ["--steps", "20", "--batch-size", "16", "--seed", "3", "--log-every", "0"]
    a = script.train(script.parse_args(common + ["--out", str(tmp_path / "a"), "--eval-per-level", "3"]))
    b = script.train(script.parse_args(common + ["--out", str(tmp_path / "b"), "--eval-per-level", "0"]))
    assert a["steps"] == 20 and len(a["losses"]) == 20 and a["losses"] == b["losses"]
    assert a["losses"][-1] < a["losses"][0]
    assert set(a["eval"]) == {"greedy", "sampled_t1", "eval_s"}
    assert set(a["eval"]["greedy"]) == {"1", "2", "3", "4", "5"}
    c = script.train(script.parse_args(["--steps", "2", "--batch-size", "16", "--seed", "4", "--log-every", "0",
                                        "--out", str(tmp_path / "c"), "--eval-per-level", "0"]))
    assert c["losses"] != a["losses"][:2]

    folder = tmp_path / "a"
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "train_log.json").read_text())["losses"] == a["losses"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    text = tok.apply_chat_template([{"role": "user", "content": "57-87="}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|user|>57-87=<|end|><|assistant|>" and model.generation_config.eos_token_id == tok.eos_token_id


def test_time_budget_mode_stops_and_records_a_horizon(script, tmp_path):
    log = script.train(script.parse_args(["--time-budget", "3", "--batch-size", "16", "--log-every", "0",
                                          "--out", str(tmp_path / "t"), "--eval-per-level", "0"]))
    assert log["steps"] >= 1 and log["train_s"] < 15


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped checkpoint")
def test_shipped_solver_answers_through_the_rollout_worker():
    """The rollout worker's own prompt path (chat template + generation prompt, HF generate, EOS cut) gets the
    trained behaviour: level 1 solved, level 5 not."""
    from actors.rollout import RolloutWorker

    folder = resolve_world_model("world:chain_sum_solver")
    assert Path(folder) == SHIPPED and (SHIPPED / "model.safetensors").stat().st_size < 5_000_000
    worker = RolloutWorker(folder, temperature=0.0, max_new_tokens=12, max_prompt_tokens=64, seed=0)
    records = [r for r in w.eval_set(24, seed=5, levels=(1, 5))]
    groups = worker.generate(records, n=1)
    by_level = {1: [], 5: []}
    for record, group in zip(records, groups):
        assert group[0].finish_reason == "stop"
        by_level[record.meta["difficulty"]].append(w.reward(record, group[0].text))
    assert sum(v == 1.0 for v in by_level[1]) / len(by_level[1]) >= 0.9
    assert sum(v == 1.0 for v in by_level[5]) / len(by_level[5]) <= 0.1
    assert isinstance(records[0], PromptRecord)
