"""The reward actor scores with a tiny real reward model, a pairwise stand-in and real Python functions."""

import math
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.reward import PAIR_TEMPLATE, RewardActor, sigmoid
from eva_ray.records import PromptRecord
from eva_ray.tiny import save_tiny_models

MODULE = "eva_ray_test_reward_fns"  # a unique name, so no other test's module of the same name is cached
REWARD_FNS = '''
import math

def length(prompt, response):
    return float(len(response))

def weird(prompt, response):
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "text": "1.0", "none": None}
    if response == "boom":
        raise ZeroDivisionError("boom")
    if response == "key":
        raise KeyError("no such key")
    return special.get(response, 1.0)

NOT_CALLABLE = 3

class Judge:
    @staticmethod
    def score(prompt, response):
        return 2.0 if prompt.id == "p0" else -2.0
'''


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = save_tiny_models(root)
    model = AutoModelForSequenceClassification.from_pretrained(paths["reward"])
    tok = AutoTokenizer.from_pretrained(paths["reward"])
    # A Llama-3-like checkpoint: no pad token anywhere, so the actor must pad with EOS and tell the head so.
    model.config.pad_token_id = None
    tok.pad_token = None
    model.save_pretrained(root / "nopad")
    tok.save_pretrained(root / "nopad")
    # A broken checkpoint whose scores are not finite.
    model.config.pad_token_id = 0
    with torch.no_grad():
        model.score.weight.fill_(math.inf)
    model.save_pretrained(root / "inf")
    AutoTokenizer.from_pretrained(paths["reward"]).save_pretrained(root / "inf")
    return {**paths, "nopad": str(root / "nopad"), "inf": str(root / "inf")}


@pytest.fixture(scope="module")
def fn_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fns")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(REWARD_FNS))
    (folder / f"{MODULE}_broken.py").write_text("raise RuntimeError('import-time failure')\n")
    sys.path.insert(0, str(folder))
    yield MODULE
    sys.path.remove(str(folder))
    for name in (MODULE, f"{MODULE}_broken"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def rm(paths):
    return RewardActor("model", model=paths["reward"], batch_size=16)


PROMPTS = [
    PromptRecord(id="p0", text="12+3="),
    PromptRecord(id="p1", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a colour."}]),
    PromptRecord(id="p2", text="Why?"),
]
RESPONSES = [["15", "It is fifteen, obviously.", ""], ["Red.", "blue"], []]


def manual_score(path: str, prompt: PromptRecord, response: str, *, keep_last: int | None = None) -> float:
    """One unpadded forward pass of the reward model on the chat-formatted pair."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    text = tok.apply_chat_template(prompt.as_messages() + [{"role": "assistant", "content": response}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ids[-keep_last:] if keep_last else ids
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


# --------------------------------------------------------------------------------------------------- model


def test_model_scores_match_a_manual_forward_and_do_not_depend_on_batching(paths, rm):
    result = rm.score(PROMPTS, RESPONSES)
    assert [len(r) for r in result.rewards] == [3, 2, 0]
    assert result.n_nonfinite == 0 and result.counts["scored"] == 5 and result.counts["valid"] == 5
    assert rm.score(PROMPTS, RESPONSES).rewards == result.rewards  # deterministic
    one_by_one = RewardActor("model", model=paths["reward"], batch_size=1).score(PROMPTS, RESPONSES)
    for batched, single in zip(result.rewards, one_by_one.rewards):
        assert batched == pytest.approx(single, abs=1e-5)  # right padding never moves the scored position
    assert result.rewards[0][1] == pytest.approx(manual_score(paths["reward"], PROMPTS[0], RESPONSES[0][1]),
                                                 abs=1e-5)
    assert result.rewards[1][0] == pytest.approx(manual_score(paths["reward"], PROMPTS[1], "Red."), abs=1e-5)
    assert len(set(result.rewards[0] + result.rewards[1])) == 5  # the response changes the score


def test_a_checkpoint_without_pad_token_is_padded_with_eos_consistently(paths):
    batched = RewardActor("model", model=paths["nopad"], batch_size=8).score(PROMPTS, RESPONSES)
    single = RewardActor("model", model=paths["nopad"], batch_size=1).score(PROMPTS, RESPONSES)
    for b, s in zip(batched.rewards, single.rewards):
        assert b == pytest.approx(s, abs=1e-5)
    assert batched.counts["valid"] == 5


def test_long_inputs_lose_prompt_tokens_from_the_left_and_are_counted(paths):
    prompt = PromptRecord(id="long", text="x" * 60 + "What is 2+2?")
    result = RewardActor("model", model=paths["reward"], max_length=24).score([prompt, PROMPTS[2]],
                                                                            [["It is 4.", "4"], ["no"]])
    assert result.counts["truncated"] == 2  # both responses to the long prompt; the short pair fits
    assert result.rewards[0][0] == pytest.approx(manual_score(paths["reward"], prompt, "It is 4.", keep_last=24),
                                                 abs=1e-5)
    assert result.rewards[1][0] == pytest.approx(manual_score(paths["reward"], PROMPTS[2], "no"), abs=1e-5)


def test_non_finite_model_scores_become_nan_and_are_counted(paths):
    result = RewardActor("model", model=paths["inf"]).score(PROMPTS, RESPONSES)
    assert result.n_nonfinite == 5 and result.counts["valid"] == 0
    assert all(math.isnan(r) for row in result.rewards for r in row)


def test_a_causal_lm_checkpoint_loads_with_one_untrained_score_output(paths, capsys):
    # How a reward model starts life (and the smoke config's RM): a plain causal LM. Without num_labels=1 the fresh
    # head would give two scores per sequence and fail at the first batch.
    rm = RewardActor("model", model=paths["policy"], batch_size=4)
    assert "untrained" in capsys.readouterr().out
    result = rm.score(PROMPTS, RESPONSES)
    assert result.counts["valid"] == 5 and all(math.isfinite(r) for row in result.rewards for r in row)
    # A checkpoint that was saved with its head keeps it and is not called untrained.
    RewardActor("model", model=paths["reward"], batch_size=4)
    assert "untrained" not in capsys.readouterr().out


def test_compare_is_the_bradley_terry_probability_of_the_pointwise_scores(rm):
    a, b = ["15", "Red."], ["It is fifteen, obviously.", "Red."]
    r = rm.score(PROMPTS[:2], [[a[0], b[0]], [a[1], b[1]]]).rewards
    probs = rm.compare(PROMPTS[:2], a, b)
    assert probs[0] == pytest.approx(sigmoid(r[0][0] - r[0][1]), abs=1e-6)
    assert probs[1] == pytest.approx(0.5, abs=1e-6)  # identical responses tie (up to batch-row float noise)
    hard = rm.compare(PROMPTS[:2], a, b, hard=True)
    assert hard == [1.0 if r[0][0] > r[0][1] else 0.0, 0.5]
    assert rm.stats()["scored"] >= 4


# ----------------------------------------------------------------------------------------------- pairwise


def manual_pair_logit(path: str, prompt: str, a: str, b: str) -> float:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tok(PAIR_TEMPLATE.format(prompt=prompt, response_a=a, response_b=b))["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_pairwise_rewards_are_mean_win_probabilities(paths):
    pm = RewardActor("pairwise", model=paths["reward"], batch_size=4)
    responses = [["15", "It is fifteen.", "16"], ["Red.", "blue"], ["Because."]]
    result = pm.score(PROMPTS, responses)
    assert [len(r) for r in result.rewards] == [3, 2, 1]
    assert result.rewards[2] == [0.5]  # a lone response has no opponent: a tie
    for row in result.rewards[:2]:
        assert all(0.0 <= r <= 1.0 for r in row)
        assert sum(row) / len(row) == pytest.approx(0.5, abs=1e-6)  # P(i>j) + P(j>i) = 1 for every pair
    assert len(set(result.rewards[0])) == 3
    # Two responses: each reward is the symmetrised probability of beating the other, from the template's text.
    prompt_text = "system: Be brief.\nuser: Name a colour."
    l_ab = manual_pair_logit(paths["reward"], prompt_text, "Red.", "blue")
    l_ba = manual_pair_logit(paths["reward"], prompt_text, "blue", "Red.")
    expected = (sigmoid(l_ab) + 1 - sigmoid(l_ba)) / 2
    assert result.rewards[1][0] == pytest.approx(expected, abs=1e-5)
    assert result.rewards[1][1] == pytest.approx(1 - expected, abs=1e-5)
    # compare: the same probability, antisymmetric, and a response against itself is a tie.
    ab = pm.compare(PROMPTS[1:2] * 2, ["Red.", "blue"], ["blue", "Red."])
    assert ab[0] == pytest.approx(expected, abs=1e-5) and ab[0] + ab[1] == pytest.approx(1.0, abs=1e-6)
    assert pm.compare(PROMPTS[:1], ["15"], ["15"]) == [pytest.approx(0.5, abs=1e-6)]
    assert pm.compare(PROMPTS[:1], ["15"], ["15"], hard=True) == [0.5]


def test_pairwise_rejects_a_template_with_unknown_fields(paths):
    with pytest.raises(ValueError, match="pair_template"):
        RewardActor("pairwise", model=paths["reward"], pair_template="{question} {response_a} {response_b}")


# ----------------------------------------------------------------------------------------------- function


def test_function_rewards_by_import_path(fn_module):
    result = RewardActor("function", function=f"{fn_module}:length").score(PROMPTS, RESPONSES)
    assert result.rewards == [[2.0, 25.0, 0.0], [4.0, 4.0], []]
    judge = RewardActor("function", function=f"{fn_module}:Judge.score").score(PROMPTS[:2], [["a"], ["b"]])
    assert judge.rewards == [[2.0], [-2.0]]


def test_nan_inf_and_raising_functions_are_counted_not_fatal(fn_module):
    actor = RewardActor("function", function=f"{fn_module}:weird")
    responses = [["ok", "nan", "inf", "-inf"], ["boom", "key", "boom"], ["text", "none", "ok"]]
    result = actor.score(PROMPTS, responses)
    values = [r for row in result.rewards for r in row]
    assert [r for r in values if not math.isnan(r)] == [1.0, 1.0]
    assert result.n_nonfinite == 3
    assert result.errors == {"ZeroDivisionError": 2, "KeyError": 1, "TypeError": 2}
    assert result.error_examples["ZeroDivisionError"] == "boom"
    assert result.counts == {"scored": 10, "valid": 2, "nonfinite": 3, "raised": 5, "truncated": 0}
    assert not any(math.isinf(r) for r in values)


def test_compare_with_a_function_gives_probabilities_or_hard_outcomes(fn_module):
    actor = RewardActor("function", function=f"{fn_module}:length")
    prompts = PROMPTS[:1] * 3
    a, b = ["aa", "a", "a"], ["a", "b", "bbb"]
    assert actor.compare(prompts, a, b, hard=True) == [1.0, 0.5, 0.0]
    probs = actor.compare(prompts, a, b)
    assert probs == pytest.approx([sigmoid(1.0), 0.5, sigmoid(-2.0)])
    weird = RewardActor("function", function=f"{fn_module}:weird")
    assert math.isnan(weird.compare(PROMPTS[:1], ["boom"], ["ok"])[0])  # no reward, no verdict


@pytest.mark.parametrize("path,error,match", [
    ("no_colon_here", ValueError, "must look like 'package.module:callable'"),
    (":length", ValueError, "must look like"),
    ("eva_ray_no_such_module_xyz:fn", ImportError, "cannot import module 'eva_ray_no_such_module_xyz'"),
    (f"{MODULE}_broken:fn", ImportError, "raised RuntimeError: import-time failure"),
    (f"{MODULE}:missing", AttributeError, "has no attribute 'missing'"),
    (f"{MODULE}:NOT_CALLABLE", TypeError, "is a int, not a callable"),
])
def test_bad_function_paths_fail_at_construction_with_a_clear_error(fn_module, path, error, match):
    with pytest.raises(error, match=match):
        RewardActor("function", function=path)


def test_bad_settings_and_batches_are_rejected(paths, fn_module):
    with pytest.raises(ValueError, match="not one of"):
        RewardActor("judge", model=paths["reward"])
    with pytest.raises(ValueError, match="needs function="):
        RewardActor("function")
    with pytest.raises(ValueError, match="needs model="):
        RewardActor("model")
    actor = RewardActor("function", function=f"{fn_module}:length")
    with pytest.raises(ValueError, match="2 prompts but 1 response lists"):
        actor.score(PROMPTS[:2], [["a"]])
    with pytest.raises(TypeError, match="list of strings"):
        actor.score(PROMPTS[:1], ["just a string"])
    with pytest.raises(ValueError, match="compare"):
        actor.compare(PROMPTS[:2], ["a"], ["b", "c"])
