"""world.reward=exact: a solve is 1, anything else (near misses the verifier credits included) is 0."""

import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.records import PromptRecord
from eva_ray.worlds import chain_sum, reward_function

TASK = PromptRecord(id="t", text="57-87=", meta={"answer": "-30", "difficulty": 2, "num_terms": 2})


@pytest.mark.parametrize("response, exact", [
    ("-30", 1.0), ("  -30\n", 1.0), ("-030", 1.0),  # what the verifier also counts as a solve
    ("-300", 0.0), ("x-30", 0.0), ("-30 and more", 0.0), ("-30-30", 0.0),  # partial credit there, none here
    ("30", 0.0), ("", 0.0), ("-", 0.0), (None, 0.0), (12, 0.0), ("-3" + "0" * 500, 0.0)])
def test_exact_reward_gives_no_partial_credit(response, exact):
    assert chain_sum.exact_reward(TASK, response) == exact
    if exact == 1.0:
        assert chain_sum.reward(TASK, response) == 1.0  # the two agree on what a solve is


def test_near_misses_that_the_verifier_credits_get_nothing():
    assert 0.0 < chain_sum.reward(TASK, "-300") < 1.0
    assert chain_sum.exact_reward(TASK, "-300") == 0.0


def test_the_answer_is_recomputed_without_meta():
    assert chain_sum.exact_reward(PromptRecord(id="u", text="5+4="), "9") == 1.0
    with pytest.raises(ValueError):
        chain_sum.exact_reward(PromptRecord(id="v", text="not a sum"), "9")


def test_world_reward_names_the_function():
    assert reward_function("chain_sum") == "eva_ray.worlds.chain_sum:reward"
    assert reward_function("chain_sum", "exact") == "eva_ray.worlds.chain_sum:exact_reward"
    with pytest.raises(ValueError, match="no reward 'fuzzy'"):
        reward_function("chain_sum", "fuzzy")
    # The world's own default; its rewards are the choices.
    assert load_config(None, ["world.name=chain_sum"]).world.reward == "verifier"
    assert load_config(None, ["world.name=chain_sum", "world.reward=exact"]).world.reward == "exact"
    with pytest.raises(ConfigError, match="world.reward"):
        load_config(None, ["world.name=chain_sum", "world.reward=fuzzy"])
    with pytest.raises(ConfigError, match="world.reward"):
        load_config(None, ["world.name=cipher", "world.reward=digits"])  # a chain_sum reward, not cipher's


def test_the_reward_actor_loads_it():
    from actors.reward import load_function

    fn = load_function(reward_function("chain_sum", "exact"))
    assert fn(TASK, "-30") == 1.0 and fn(TASK, "-300") == 0.0


SUM = PromptRecord(id="s", text="558+257=", meta={"answer": "815", "difficulty": 3, "num_terms": 2})


@pytest.mark.parametrize("response, credit", [
    ("815", 1.0), (" +0815 ", 1.0),  # a solve, as exact_reward counts it
    ("805", 2 / 3), ("814", 2 / 3), ("915", 2 / 3), ("715", 2 / 3),  # one digit off: the others keep their credit
    ("851", 1 / 3), ("15", 2 / 3), ("5815", 3 / 4),  # too short, or padded: scored over the longer of the two
    ("-815", 0.0), ("8 15", 0.0), ("", 0.0), (None, 0.0), ("9" * 5000, 0.0)])  # wrong sign, not an integer, all wrong
def test_digits_reward_credits_each_right_digit_from_the_units(response, credit):
    assert chain_sum.digits_reward(SUM, response) == pytest.approx(credit)
    assert (chain_sum.exact_reward(SUM, response) == 1.0) == (credit == 1.0)


def test_digits_reward_handles_signs_and_zero():
    assert chain_sum.digits_reward(TASK, "-30") == 1.0 and chain_sum.digits_reward(TASK, "-20") == 0.5
    assert chain_sum.digits_reward(TASK, "30") == 0.0  # the sign is part of the answer
    zero = PromptRecord(id="z", text="5-5=")
    assert chain_sum.digits_reward(zero, "0") == 1.0 and chain_sum.digits_reward(zero, "-0") == 1.0
    assert chain_sum.exact_reward(zero, "-0") == 1.0
    assert reward_function("chain_sum", "digits") == "eva_ray.worlds.chain_sum:digits_reward"
    assert load_config(None, ["world.name=chain_sum", "world.reward=digits"]).world.reward == "digits"


def test_a_huge_response_or_a_bad_answer_never_crashes_inside_int():
    assert chain_sum.exact_reward(SUM, "8" * 10_000) == 0.0
    with pytest.raises(ValueError, match="is not an integer"):
        chain_sum.exact_reward(PromptRecord(id="b", text="1+1=", meta={"answer": "two"}), "2")
