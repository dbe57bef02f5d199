"""The dtypes the project knows, by the names torch gives them: the one table every module reads.

Names, not ``torch.dtype`` objects, so the config offers them as choices without importing torch (and a weight
manifest stays plain data); :func:`torch_dtypes` resolves names to dtypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""What a model may hold its weights and compute in (``model.dtype``, the rollout and reward models)."""

TENSOR_DTYPES: tuple[str, ...] = (*COMPUTE_DTYPES, "float64", "int64", "int32", "uint8", "bool")
"""What a weight manifest may name: every dtype a parameter or persistent buffer of a supported model has."""


def torch_dtypes(names: tuple[str, ...] = COMPUTE_DTYPES) -> dict[str, torch.dtype]:
    """``{name: torch.dtype}`` for ``names``, in their order."""
    import torch

    return {name: getattr(torch, name) for name in names}
