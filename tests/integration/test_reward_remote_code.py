"""A reward model whose remote code was written for transformers 4.x loads and scores through the reward actor.

The tiny model below is shaped like ArmoRM-Llama3-8B-v0.1 (the paper's reward model): a ``LlamaPreTrainedModel``
subclass in a ``modeling_custom.py`` next to its weights, found through ``auto_map``, that imports what ArmoRM's
modeling file imports (``LLAMA_INPUTS_DOCSTRING`` from ``transformers.models.llama.modeling_llama``, gone in
transformers 5; ``ModelOutput`` and ``add_start_docstrings_to_model_forward`` from ``transformers.utils``), calls
``LlamaModel`` with 4.x keywords, reads the score just before the first pad token and returns ``.score``.
"""

from __future__ import annotations

import json

import pytest
import torch

from actors.reward import RewardActor
from eva_ray.records import PromptRecord

MODELING = '''
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING
from transformers.utils import ModelOutput
from transformers.utils import add_start_docstrings_to_model_forward


@dataclass
class GatedOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class TinyGatedReward(LlamaPreTrainedModel):
    """Several objectives from the last token, mixed by weights read at the assistant marker (ArmoRM's shape)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.num_objectives = config.to_dict().get("num_objectives", 3)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, self.num_objectives)
        self.post_init()

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                             return_dict=return_dict)
        hidden = outputs[0]
        rows = torch.arange(input_ids.shape[0], device=hidden.device)
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(hidden[rows, last])
        marker = [max(i for i, t in enumerate(ids.tolist()) if t == self.config.gating_token_id) for ids in input_ids]
        gating = torch.softmax(self.gating(hidden[rows, marker]), dim=-1)
        score = (gating * rewards).sum(dim=1)
        return GatedOutput(rewards=rewards, gating_output=gating, score=score, logits=score)
'''

LEGACY_IMPORT = "from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING"
PROMPTS = [PromptRecord(id="a", text="What is 2+2?"), PromptRecord(id="b", text="Name a colour.")]
RESPONSES = [["4", "It is four.", "5"], ["Blue", "A colour is a colour", "red, of course"]]


@pytest.fixture(scope="module")
def remote_code_reward(tmp_path_factory) -> str:
    import importlib.util

    from transformers import LlamaConfig

    from eva_ray.tiny import ROLE_TOKENS, char_tokenizer

    folder = tmp_path_factory.mktemp("armorm-shaped")
    tokenizer = char_tokenizer()
    (folder / "modeling_custom.py").write_text(MODELING)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         num_objectives=3, gating_token_id=tokenizer.convert_tokens_to_ids(ROLE_TOKENS["assistant"]))
    # Build the weights with the same class, its removed import replaced here only (the actor must load the file
    # as it is).
    builder = folder.parent / "build_modeling_custom.py"
    builder.write_text(MODELING.replace(LEGACY_IMPORT, 'LLAMA_INPUTS_DOCSTRING = ""'))
    spec = importlib.util.spec_from_file_location("tiny_modeling_custom", builder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    module.TinyGatedReward(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["architectures"] = ["TinyGatedReward"]
    saved["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.TinyGatedReward"}
    (folder / "config.json").write_text(json.dumps(saved))
    return str(folder)


def test_a_reward_model_with_4x_remote_code_loads_and_scores_through_the_actor(remote_code_reward, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    from actors.legacy_remote_code import LEGACY_NAMES

    assert LEGACY_IMPORT in MODELING
    for name, text in LEGACY_NAMES["transformers.models.llama.modeling_llama"].items():
        if getattr(llama, name, None) == text:  # added by an earlier test in this process: the actor must add it
            monkeypatch.delattr(llama, name)
    batched = RewardActor("model", model=remote_code_reward, trust_remote_code=True, batch_size=8)
    result = batched.score(PROMPTS, RESPONSES)
    flat = [r for row in result.rewards for r in row]
    assert result.counts["valid"] == 6 and len(set(flat)) == 6, result
    # Right padding read the way the model's own code reads it: a batch scores what each sequence scores alone.
    alone = RewardActor("model", model=remote_code_reward, trust_remote_code=True, batch_size=1)
    assert torch.allclose(torch.tensor(alone.score(PROMPTS, RESPONSES).rewards), torch.tensor(result.rewards),
                          atol=1e-5)


def test_the_legacy_names_are_documentation_strings_and_never_replace_existing_ones():
    import transformers.models.llama.modeling_llama as llama

    from actors.legacy_remote_code import LEGACY_NAMES, provide_legacy_names

    provide_legacy_names()
    assert provide_legacy_names() == []  # a second call adds nothing: present names are left alone
    for name in LEGACY_NAMES["transformers.models.llama.modeling_llama"]:
        assert isinstance(getattr(llama, name), str)
    assert llama.LlamaModel.__name__ == "LlamaModel"


def test_reward_dtype_auto_is_float32_on_the_cpu_and_bfloat16_on_a_gpu():
    from actors.reward import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_dtype("float16", torch.device("cuda", 0)) == "float16"
    with pytest.raises(ValueError, match="auto"):
        RewardActor("model", model="x", dtype="fp8")
