"""The work scripts/bench_peer.py gives TRL and eva-ray: its reward, its config, its model and its prompts."""

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.reward import RewardActor
from eva_ray import peer_work
from eva_ray.config import from_dict, load_config
from eva_ray.records import PromptRecord


def test_digit_reward_counts_digits_in_both_forms():
    assert peer_work.digit_reward(PromptRecord(id="p", text="x"), "a1b22 3") == 4.0
    assert peer_work.digit_reward(None, "no digits") == 0.0
    assert peer_work.digit_reward(None, None) == 0.0  # not a response: no reward, no exception
    chat = [[{"role": "assistant", "content": "12x"}], "7", [{"role": "assistant", "content": ""}]]
    assert peer_work.trl_digit_reward(chat) == [2.0, 1.0, 0.0]


def test_reward_actor_calls_the_digit_reward_by_its_import_path():
    actor = RewardActor("function", function=peer_work.REWARD_FUNCTION)
    result = actor.score([PromptRecord(id="p", text="x")], [["1", "a23", "b"]])
    assert result.rewards == [[1.0, 2.0, 0.0]]


def test_prompts_are_distinct_printable_and_deterministic(tmp_path):
    texts = peer_work.prompts()
    assert len(texts) == peer_work.N_PROMPTS == len(set(texts))
    assert texts == peer_work.prompts() and texts != peer_work.prompts(seed=1)
    assert all(t.isprintable() and len(t) < 80 for t in texts)
    path = peer_work.write_prompts(tmp_path / "d.jsonl", n=20)
    assert peer_work.read_prompts(path) == texts[:20]


def test_eva_config_loads_and_matches_the_work(tmp_path):
    cfg = from_dict(peer_work.eva_config("/m", "/d.jsonl", steps=200, output_dir="/o"))
    assert (cfg.solver.algorithm, cfg.solver.n_responses, cfg.solver.beta) == ("rloo", 4, 0.05)
    assert (cfg.creator.batch_size, cfg.rollout.max_new_tokens, cfg.learner.lr) == (8, 32, 1e-4)
    assert cfg.evolve.method == "none" and cfg.logging.eval_every == 0 and cfg.world.name is None
    assert cfg.reward.function == peer_work.REWARD_FUNCTION
    assert cfg.creator.seed_epochs * peer_work.N_PROMPTS >= 200 * 8  # D outlasts the run
    # The YAML file takes the CLI's path: defaults < file < overrides.
    path = peer_work.write_eva_config(tmp_path / "eva.yaml", "/m", "/d.jsonl", steps=40, output_dir="/o")
    cfg = load_config(path, ["run.total_steps=7"])
    assert cfg.run.total_steps == 7 and cfg.data.path == "/d.jsonl" and cfg.model.path == "/m"


def test_trl_settings_match_the_eva_config():
    kw = peer_work.trl_config_kwargs("/o", steps=40)
    cfg = from_dict(peer_work.eva_config("/m", "/d", steps=40, output_dir="/o"))
    assert kw["per_device_train_batch_size"] == cfg.creator.batch_size * cfg.solver.n_responses
    assert kw["num_generations"] == cfg.solver.n_responses
    assert kw["max_completion_length"] == cfg.rollout.max_new_tokens
    assert (kw["learning_rate"], kw["beta"], kw["temperature"]) == (cfg.learner.lr, cfg.solver.beta,
                                                                    cfg.rollout.temperature)
    assert kw["report_to"] == "none" and kw["eval_strategy"] == "no" and kw["max_steps"] == 40


def test_model_folder_loads_with_from_pretrained(tmp_path):
    folder = peer_work.build_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (2, 128, 256)
    assert c.vocab_size == len(tok) and tok.chat_template
    again = peer_work.build_model(tmp_path / "again")  # seeded: the same weights, byte for byte
    assert (Path(folder) / "model.safetensors").read_bytes() == (Path(again) / "model.safetensors").read_bytes()
