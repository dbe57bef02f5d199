"""Worlds: procedural task families with a verifier, a difficulty knob and a shipped solver.

A world gives eva a place where the creator's effect is measurable without an LLM judge: tasks at known
difficulties, a reward that is the task's own verifier, and a held-out evaluation set by level. Each world is a
:class:`~eva_ray.worlds.base.World` subclass registered by name (the interface and how to add one are in
:mod:`eva_ray.worlds.base`). Ray-free, like the rest of ``eva_ray``.

    from eva_ray.worlds import make_world, resolve_world_model
    world = make_world("cipher", {"letters": 10}, seed=42)   # a World; its knobs are world.params in a config
    D = world.seed_set(300, {3: 1, 4: 1, 5: 1, 6: 1}, seed=0)
    folder = resolve_world_model("world:cipher_solver")      # the shipped pretrained solver (a Hugging Face folder)

Shipped solvers live in ``eva_ray/worlds/checkpoints/<name>/`` (``save_pretrained`` folders, safetensors) and are
named in a config as ``world:<name>``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eva_ray.worlds.base import WORLDS, Task, World, WorldParamError, register_world

_BUILT_IN = ("chain_sum", "cipher")
WORLD_SCHEME = "world:"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
WORLD_MODELS: dict[str, str] = {"chain_sum_solver": "chain_sum", "cipher_solver": "cipher"}
"""Shipped checkpoints (folder name under :data:`CHECKPOINT_DIR`) and the world each one solves."""

for _module in _BUILT_IN:  # importing a built-in world registers it
    importlib.import_module(f"eva_ray.worlds.{_module}")


def get_world(name: str) -> type[World]:
    """The class of world ``name``."""
    if name not in WORLDS:
        raise ValueError(f"world.name: unknown world {name!r}; known: {', '.join(WORLDS)}")
    return WORLDS[name]


def make_world(name: str, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> World:
    """World ``name`` with its ``world.params`` and the run's seed (a world may draw hidden rules from it)."""
    return get_world(name)(params, seed=seed)


def world_of(cfg: Any) -> World | None:
    """The world of a run config (``cfg.world``), or None when the run reads its prompts from data."""
    if not cfg.world.name:
        return None
    return make_world(cfg.world.name, cfg.world.params, seed=cfg.run.seed)


def reward_function(name: str, mode: str | None = None) -> str:
    """The ``reward.function`` path (``module:callable``) of world ``name``'s reward ``mode`` (``world.reward``)."""
    return get_world(name).reward_function(mode)


def is_world_model(path: str | None) -> bool:
    return path is not None and path.startswith(WORLD_SCHEME)


def resolve_world_model(path: str) -> str:
    """``world:chain_sum_solver`` -> the folder of that shipped checkpoint (absolute path)."""
    name = path[len(WORLD_SCHEME):] if is_world_model(path) else path
    if name not in WORLD_MODELS:
        raise ValueError(f"{path!r}: a shipped world model is one of "
                         f"{', '.join(WORLD_SCHEME + n for n in WORLD_MODELS)}")
    folder = CHECKPOINT_DIR / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path!r}: {folder} holds no checkpoint; make it with the world's pretraining "
                                f"script (scripts/pretrain_{WORLD_MODELS[name]}.py or scripts/pretrain_solver.py)")
    return str(folder)


__all__ = ["CHECKPOINT_DIR", "Task", "WORLDS", "WORLD_MODELS", "WORLD_SCHEME", "World", "WorldParamError",
           "get_world", "is_world_model", "make_world", "register_world", "resolve_world_model", "reward_function",
           "world_of"]
