"""The rollout worker samples real tokens from a tiny real policy: order, n, EOS, truncation, seeds, weight sync."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_backend import cut_at_eos
from actors.rollout import VLLM_MISSING, RolloutWorker
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout, response_texts, shard, unshard
from eva_ray.tiny import END, ROLE_TOKENS, save_tiny_models


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(paths):
    return AutoTokenizer.from_pretrained(paths["policy"])


@pytest.fixture(scope="module")
def eos_weights(paths):
    """State dicts of the tiny policy edited so that EOS is always / sometimes the next token.

    The LM head is tied to the embedding. Giving every token a large embedding coordinate 0 makes the residual
    stream's coordinate 0 large and positive; a final norm that keeps only coordinate 0 then turns the logits into
    (that positive number) x (each token's coordinate 0), so raising EOS's coordinate 0 raises P(EOS) at every step.
    """
    def build(eos_margin: float) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(paths["policy"])
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb[:, 0] = 10.0
            emb[model.config.eos_token_id, 0] = 10.0 + eos_margin
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
        return {k: v.clone() for k, v in model.state_dict().items()}

    return {"always": build(10.0), "sometimes": build(0.45)}


def worker(paths, **kw) -> RolloutWorker:
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("max_prompt_tokens", 64)
    return RolloutWorker(paths["policy"], **kw)


PROMPTS = [
    PromptRecord(id="p0", text="12+3="),
    PromptRecord(id="p1", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a colour."}]),
    PromptRecord(id="p2", text="Why?"),
]


def chat_ids(tok, prompt: PromptRecord) -> list[int]:
    text = tok.apply_chat_template(prompt.as_messages(), add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]



# ------------------------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize("size,n", [(0, 3), (2, 3), (7, 3), (8, 2), (5, 1), (9, 4)])
def test_shard_is_contiguous_near_equal_and_unshard_restores_order(size, n):
    items = list(range(size))
    parts = shard(items, n)
    assert len(parts) == n
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert unshard(parts) == items == unshard(parts, [len(p) for p in parts])
    assert all(p == list(range(p[0], p[0] + len(p))) for p in parts if p)  # contiguous runs


def test_shard_and_unshard_reject_bad_input_and_rollout_rejects_unknown_finish_reason():
    with pytest.raises(ValueError, match="n_workers"):
        shard([1, 2], 0)
    with pytest.raises(ValueError, match=r"answered \[2, 1\] items for shards of sizes \[2, 2\]"):
        unshard([[1, 2], [3]], [2, 2])
    with pytest.raises(ValueError, match="finish_reason"):
        Rollout("p", [1], [2], "x", "eos", 0)


def test_cut_at_eos_keeps_the_first_eos_and_drops_the_padding_after_it():
    assert cut_at_eos([5, 6, 3, 0, 0], frozenset({3})).token_ids == [5, 6, 3]
    assert cut_at_eos([5, 6, 3, 0, 0], frozenset({3})).finish_reason == "stop"
    assert cut_at_eos([5, 6, 7], frozenset({3})).finish_reason == "length"


# --------------------------------------------------------------------------------------------------- generation


def test_generate_returns_n_rollouts_per_prompt_in_prompt_order(paths, tok):
    w = worker(paths, seed=0)
    groups = w.generate(PROMPTS, n=3)
    assert len(groups) == len(PROMPTS) and all(len(g) == 3 for g in groups)
    for prompt, group in zip(PROMPTS, groups):
        for r in group:
            assert r.prompt_id == prompt.id
            assert r.prompt_token_ids == chat_ids(tok, prompt)  # no padding, chat template + generation prompt
            assert r.prompt_token_ids[-1] == tok.convert_tokens_to_ids(ROLE_TOKENS["assistant"])
            assert 1 <= len(r.response_token_ids) <= 12
            assert r.text == tok.decode(r.response_token_ids, skip_special_tokens=True)
            assert r.policy_version == 0
    assert len({tuple(r.response_token_ids) for g in groups for r in g}) > 1  # sampled, not one repeated answer
    stats = w.stats()
    assert stats["prompts"] == 3 and stats["responses"] == 9 and stats["calls"] == 1
    assert stats["tokens_generated"] == sum(len(r.response_token_ids) for g in groups for r in g)
    assert stats["tokens_per_s"] > 0 and stats["truncated_prompts"] == 0
    assert w.generate([], n=2) == []
    with pytest.raises(ValueError, match="n must be"):
        w.generate(PROMPTS, n=0)
    with pytest.raises(TypeError, match="PromptRecord"):
        w.generate(["12+3="], n=1)


def test_left_padding_does_not_change_a_prompts_greedy_answer(paths):
    """Batched prompts of different lengths are left-padded and masked, so each answer is what it is alone."""
    w = worker(paths, temperature=0.0, max_new_tokens=8)
    batched = w.generate(PROMPTS, n=2)
    assert all(g[0].response_token_ids == g[1].response_token_ids for g in batched)  # greedy: n identical copies
    alone = [w.generate([p], n=1)[0][0].response_token_ids for p in PROMPTS]
    assert [g[0].response_token_ids for g in batched] == alone


def test_eos_is_kept_in_token_ids_and_sets_finish_reason(paths, tok, eos_weights):
    eos = tok.convert_tokens_to_ids(END)
    w = worker(paths, max_new_tokens=6)
    w.update_weights(eos_weights["always"], version=1)
    for r in [r for g in w.generate(PROMPTS, n=2) for r in g]:
        assert r.response_token_ids == [eos] and r.finish_reason == "stop" and r.text == ""

    w.update_weights(eos_weights["sometimes"], version=2)
    rollouts = [r for g in w.generate(PROMPTS * 3, n=4) for r in g]
    reasons = {r.finish_reason for r in rollouts}
    assert reasons == {"stop", "length"}  # both kinds occur, so mid-batch stops with padding after them are covered
    for r in rollouts:
        ids = r.response_token_ids
        if r.finish_reason == "stop":
            assert ids[-1] == eos and eos not in ids[:-1]  # cut right after the first EOS, nothing padded kept
        else:
            assert len(ids) == 6 and eos not in ids
        assert END not in r.text and r.policy_version == 2
    stats = w.stats()
    assert stats["finished_stop"] + stats["finished_length"] == stats["responses"]


def test_long_prompts_are_left_truncated_and_counted(paths, tok):
    long = PromptRecord(id="long", text="x" * 50 + "END?")
    w = worker(paths, max_prompt_tokens=12)
    groups = w.generate([long, PROMPTS[0]], n=1)
    full = chat_ids(tok, long)
    assert len(full) > 12
    assert groups[0][0].prompt_token_ids == full[-12:]  # the end (question + assistant header) survives
    assert groups[1][0].prompt_token_ids == chat_ids(tok, PROMPTS[0])  # 8 ids: untouched
    assert w.stats()["truncated_prompts"] == 1


def test_a_fixed_seed_reproduces_samples_and_other_seeds_or_calls_differ(paths):
    first = worker(paths, seed=7)
    a1, a2 = response_texts(first.generate(PROMPTS, n=2)), response_texts(first.generate(PROMPTS, n=2))
    again = worker(paths, seed=7)
    assert response_texts(again.generate(PROMPTS, n=2)) == a1
    assert response_texts(again.generate(PROMPTS, n=2)) == a2
    assert a1 != a2  # each call draws fresh samples
    assert response_texts(worker(paths, seed=8).generate(PROMPTS, n=2)) != a1
    assert response_texts(worker(paths, seed=7, worker_index=1).generate(PROMPTS, n=2)) != a1
    # The caller's global random state is left alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first.generate(PROMPTS[:1], n=1)
    assert torch.equal(torch.rand(3), expected)


def test_static_cache_samples_the_same_tokens_as_the_dynamic_cache(paths):
    """The GPU speed option must not change what is sampled (on CPU it runs uncompiled, so this is quick)."""
    dynamic = worker(paths, seed=5).generate(PROMPTS, n=2)
    static = worker(paths, seed=5, static_cache=True).generate(PROMPTS, n=2)
    assert [[r.response_token_ids for r in g] for g in static] == [[r.response_token_ids for r in g] for g in dynamic]


# ------------------------------------------------------------------------------------------------ weight updates


def test_update_weights_changes_outputs_and_versions_never_go_back(paths, eos_weights):
    w = worker(paths, seed=3)
    before = response_texts(w.generate(PROMPTS, n=2))
    assert w.policy_version == 0
    w.update_weights(eos_weights["always"], version=4)
    assert w.policy_version == 4
    after = w.generate(PROMPTS, n=2)
    assert response_texts(after) != before and all(r.policy_version == 4 for g in after for r in g)
    w.update_weights(eos_weights["always"], version=4)  # re-sending the same version is fine
    with pytest.raises(ValueError, match="must not go backwards: have 4, got 3"):
        w.update_weights(eos_weights["always"], version=3)
    assert w.policy_version == 4


def test_update_weights_is_strict_about_names_and_shapes(paths, eos_weights):
    w = worker(paths)
    good = eos_weights["always"]
    with pytest.raises(ValueError, match=r"unknown name.*bogus\.weight"):
        w.update_weights({**good, "bogus.weight": torch.zeros(1)}, version=1)
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing parameter.*model\.norm\.weight"):
        w.update_weights(missing, version=1)
    wrong = {**good, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.norm\.weight"):
        w.update_weights(wrong, version=1)
    assert w.policy_version == 0  # a rejected update changes nothing
    # The LM head is tied to the embedding: sending one of the two names is enough (DeepSpeed sends only one).
    w.update_weights({k: v for k, v in good.items() if k != "lm_head.weight"}, version=1)
    assert w.generate(PROMPTS[:1], n=1)[0][0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------------- errors


def test_vllm_backend_without_vllm_gives_a_clear_error(paths, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError) as info:
        RolloutWorker(paths["policy"], backend="vllm")
    assert str(info.value) == VLLM_MISSING


@pytest.mark.parametrize("kw,match", [
    ({"backend": "sglang"}, "backend 'sglang'"),
    ({"dtype": "fp8"}, "dtype 'fp8'"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
])
def test_bad_settings_are_rejected_before_loading(paths, kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutWorker(paths["policy"], **kw)
