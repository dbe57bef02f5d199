"""The attention kernel every policy loader uses: eager where the model caps its attention logits."""

from transformers import Gemma2Config, LlamaConfig, Qwen2Config

from eva_ray.attention import attention_implementation, attention_softcap


def test_a_soft_capped_model_gets_eager_attention_and_the_others_the_library_default():
    assert attention_implementation(Gemma2Config()) == "eager"
    assert attention_softcap(Gemma2Config(attn_logit_softcapping=5.0)) == 5.0
    assert attention_implementation(LlamaConfig()) is None
    assert attention_implementation(Qwen2Config()) is None


def test_a_gemma2_without_its_cap_is_left_to_the_library():
    assert attention_implementation(Gemma2Config(attn_logit_softcapping=None)) is None
