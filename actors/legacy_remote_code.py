"""A narrow shim for remote-code models written against transformers 4.x: the documentation constants they import.

transformers 5 removed the per-model docstring constants (``LLAMA_INPUTS_DOCSTRING``, ``LLAMA_START_DOCSTRING``) from
``transformers.models.llama.modeling_llama``. Remote code written for 4.x imports them to decorate its ``forward``
(``@add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)``); RLHFlow's ArmoRM-Llama3-8B-v0.1, the paper's
reward model, is one (its ``modeling_custom.py``). Loading such a model fails with an ImportError before any weight is
read, although the constants only ever fill in documentation.

:func:`provide_legacy_names` defines exactly those constants, as short documentation strings, where the installed
transformers lacks them. It never replaces a name that exists, touches nothing else, and is applied only when the
caller has already allowed remote code. Everything else such code imports (``LlamaModel``, ``LlamaPreTrainedModel``,
``transformers.utils.ModelOutput``, ``add_start_docstrings_to_model_forward``) still exists in transformers 5.19 and
5.25.
"""

from __future__ import annotations

import importlib

LEGACY_NAMES: dict[str, dict[str, str]] = {
    "transformers.models.llama.modeling_llama": {
        "LLAMA_START_DOCSTRING": ("    A Llama model (documentation constant provided for remote code written for "
                                  "transformers 4.x).\n"),
        "LLAMA_INPUTS_DOCSTRING": "    Args:\n        input_ids, attention_mask, ...: as for `LlamaModel`.\n",
    },
}
"""Module -> names defined there when absent. Only documentation constants belong here: each is a plain string."""


def provide_legacy_names() -> list[str]:
    """Define every name of :data:`LEGACY_NAMES` that its module lacks; returns the ``module.name`` entries added."""
    added = []
    for module_name, names in LEGACY_NAMES.items():
        module = importlib.import_module(module_name)
        for name, text in names.items():
            if not hasattr(module, name):
                setattr(module, name, text)
                added.append(f"{module_name}.{name}")
    return added
