"""Resumable learner checkpoints: DeepSpeed's own (weights, optimizer, LR schedule) plus the version and RNG state.

:class:`CheckpointIO` is a part of :class:`actors.learner.Learner` (a mixin) and reads the engine and the version it
set up.
"""

from __future__ import annotations

from typing import Any

import torch


class CheckpointIO:
    """Saving and loading the learner's full training state."""

    # Set by the learner.
    engine: Any
    device: torch.device
    _version: int
    _closed: bool

    def save_checkpoint(self, path: str) -> dict[str, Any]:
        """Write a resumable checkpoint to the folder ``path``: weights, optimizer, LR schedule (DeepSpeed's own
        ``save_checkpoint``), and the version and RNG state (``learner.json``, written by rank 0 only).

        A collective: every rank calls it with the same ``path`` (a folder all ranks can reach). Returns the version
        saved and the bytes rank 0 sees under ``path``.
        """
        if self._closed:
            raise RuntimeError("save_checkpoint on a closed learner")
        from pathlib import Path

        from eva_ray.atomic import write_json

        folder = Path(path)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if rank0:
            folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(folder), tag=_CHECKPOINT_TAG, save_latest=False)
        if rank0:
            state = {"version": self._version, "torch_rng": _b64(torch.get_rng_state()),
                     "cuda_rng": _b64(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None}
            write_json(folder / _LEARNER_STATE, state)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank reports the checkpoint written before rank 0's state is there
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if rank0 else 0
        return {"version": self._version, "bytes": size}

    def load_checkpoint(self, path: str) -> int:
        """Continue from a checkpoint :meth:`save_checkpoint` wrote (into a learner built with the same config).

        A collective, like saving. Restores weights, optimizer and LR schedule and the version; returns the version.
        """
        if self._closed:
            raise RuntimeError("load_checkpoint on a closed learner")
        import json
        from pathlib import Path

        folder = Path(path)
        state_file = folder / _LEARNER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{folder} is not a learner checkpoint (no {_LEARNER_STATE})")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=_CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {folder} (tag {_CHECKPOINT_TAG})")
        state = json.loads(state_file.read_text())
        self._version = int(state["version"])
        torch.set_rng_state(_unb64(state["torch_rng"]))
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(_unb64(state["cuda_rng"]))
        return self._version


_CHECKPOINT_TAG = "deepspeed"
_LEARNER_STATE = "learner.json"


def _b64(tensor: torch.Tensor) -> str:
    import base64

    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    import base64

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
