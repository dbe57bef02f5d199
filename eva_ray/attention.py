"""Which attention kernel a transformers model must be loaded with so it computes what the rollout engine computes.

Gemma-2 caps its attention logits (``attn_logit_softcapping``: ``cap * tanh(scores / cap)`` before the softmax).
vLLM applies that cap when it samples. transformers does only with some kernels: ``eager``, ``flex_attention`` and
the flash-attention kernels pass it on, while ``sdpa`` has no such argument. Up to transformers 5.19 (what vLLM
0.32 pins) Gemma-2 declares SDPA support, an unset ``attn_implementation`` becomes ``sdpa`` and the cap is silently
dropped: the learner's and the reference's log-probs then come from another function than the one the engine
sampled from. Later transformers refuse SDPA for Gemma-2 instead. Loading with ``eager`` gives the capped function
on every version, at the cost of materialising the score matrix (``docs/memory.md`` counts it).

Every loader of a policy-shaped model (the learner's policy and reference, the HF rollout backend) asks here.
"""

from __future__ import annotations

from typing import Any

SOFTCAP_KEYS = ("attn_logit_softcapping",)
"""Config fields that cap attention logits (Gemma-2's name; a model without them is unaffected)."""


def attention_softcap(config: Any) -> float | None:
    """The attention logit cap of a transformers config (its text config for multimodal ones), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in SOFTCAP_KEYS:
        value = getattr(text, key, None)
        if value:
            return float(value)
    return None


def attention_implementation(config: Any) -> str | None:
    """``"eager"`` when the model caps its attention logits, else None (the library's own choice, SDPA today).

    Pass the result as ``attn_implementation=`` to ``from_pretrained``; None leaves it unset.
    """
    return "eager" if attention_softcap(config) is not None else None
