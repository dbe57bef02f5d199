"""Worlds: procedural task families with a verifier, a difficulty knob and (optionally) a shipped solver.

A world gives eva a place where the creator's effect is measurable without an LLM judge: tasks at known
difficulties, a reward that is the task's own verifier, and a held-out evaluation set by level. Ray-free, like the
rest of ``eva_ray``; reasoning-gym (the task generators) is imported only when a task is made or scored.

    from eva_ray.worlds import get_world, resolve_world_model
    world = get_world("chain_sum")                       # the module eva_ray.worlds.chain_sum
    folder = resolve_world_model("world:chain_sum_solver")   # the shipped SFT solver (a Hugging Face folder)
    reward_function("chain_sum", "exact")                # "eva_ray.worlds.chain_sum:exact_reward"

Shipped solvers live in ``eva_ray/worlds/checkpoints/<name>/`` (``save_pretrained`` folders, safetensors) and are
named in a config as ``world:<name>``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

WORLDS: tuple[str, ...] = ("chain_sum",)
WORLD_SCHEME = "world:"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
WORLD_MODELS: dict[str, str] = {"chain_sum_solver": "chain_sum"}
"""Shipped checkpoints (folder name under :data:`CHECKPOINT_DIR`) and the world each one solves."""


def get_world(name: str) -> ModuleType:
    """The module of world ``name`` (it provides seed_set, eval_set, reward, sample_task, task_params, ...)."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(WORLDS)}")
    return importlib.import_module(f"eva_ray.worlds.{name}")


def reward_function(name: str, mode: str = "verifier") -> str:
    """The ``reward.function`` path (``module:callable``) of world ``name``'s reward ``mode`` (``world.reward``)."""
    rewards = getattr(get_world(name), "REWARDS", {"verifier": "reward"})
    if mode not in rewards:
        raise ValueError(f"world {name!r} has no reward {mode!r}; it has: {', '.join(rewards)}")
    return f"eva_ray.worlds.{name}:{rewards[mode]}"


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
        raise FileNotFoundError(f"{path!r}: {folder} holds no checkpoint; train it with scripts/pretrain_solver.py "
                                f"--out {folder}")
    return str(folder)


__all__ = ["CHECKPOINT_DIR", "WORLDS", "WORLD_MODELS", "WORLD_SCHEME", "get_world", "is_world_model",
           "resolve_world_model", "reward_function"]
