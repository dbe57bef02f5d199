"""The learner's weights going out: iterated (gathered under ZeRO-3), fingerprinted, sent over the weight channel
to the rollout workers, returned as a state dict, and saved as a Hugging Face folder.

:class:`WeightExport` is a part of :class:`actors.learner.Learner` (a mixin): it reads the engine, the reference,
the version and the device the learner set up, and owns the weight channel's state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from actors.learner_setup import _load_causal_lm
from actors.weight_channel import ChannelSpec, WeightChannel, collective, host_store, send
from eva_ray.config import ModelConfig
from eva_ray.dtypes import torch_dtypes
from eva_ray.weights import fingerprint, spec_of


class WeightExport:
    """Weight export and the weight channel, for the learner."""

    # Set by the learner.
    engine: Any
    reference: Any
    model_path: str
    model_cfg: ModelConfig
    device: torch.device
    _deepspeed: Any
    _rank: int
    _version: int
    _channel: WeightChannel | None = None
    _channel_store: Any = None
    _channel_spec: ChannelSpec | None = None

    @contextmanager
    def _gathered(self, param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        """The full tensor of ``param`` (ZeRO-3: gathered from every rank for the duration of the block)."""
        if hasattr(param, "ds_id"):
            with self._deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield param.data
        else:
            yield param.data

    def _weight_entries(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """``(names, tensor)`` per parameter (``state_dict`` order), then per persistent buffer; nothing gathered."""
        module = self.engine.module
        keys = list(module.state_dict(keep_vars=True).keys())
        key_set = set(keys)
        by_param: dict[int, list[str]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if name in key_set:
                by_param.setdefault(id(param), []).append(name)
                params[id(param)] = param
        order = {name: i for i, name in enumerate(keys)}
        for pid in sorted(by_param, key=lambda p: order[by_param[p][0]]):
            yield by_param[pid], params[pid]
        param_names = {n for names in by_param.values() for n in names}
        for name, buf in module.named_buffers():
            if name in key_set and name not in param_names:
                yield [name], buf

    def iter_weights(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield ``(names, tensor)`` per parameter (in ``state_dict`` order), then per persistent buffer.

        ``names`` lists every ``state_dict`` key of the tensor (tied weights, e.g. an LM head sharing the embedding,
        appear once with both names). Under ZeRO-3 the tensor is gathered only while the consumer holds it: use it
        (copy, broadcast) before advancing. A collective under ZeRO-3: every rank must iterate.
        """
        for names, tensor in self._weight_entries():
            if isinstance(tensor, torch.nn.Parameter):
                with self._gathered(tensor) as full:
                    yield names, full
            else:
                yield names, tensor

    def weights_fingerprint(self) -> list[float]:
        """:func:`eva_ray.weights.fingerprint` of what :meth:`iter_weights` yields (a collective under ZeRO-3)."""
        return fingerprint(tensor for _, tensor in self.iter_weights())

    def weight_manifest(self) -> list[list]:
        """Names, full shapes and dtypes of what :meth:`iter_weights` yields, in order, without gathering anything."""
        return [spec_of(names, t, getattr(t, "ds_shape", None)).as_list() for names, t in self._weight_entries()]

    # ------------------------------------------------------------------------------------------ weight channel

    def open_weight_channel(self, host: str, world_size: int, *, bucket_bytes: int, timeout_s: float,
                            backend: str = "auto") -> dict[str, Any]:
        """Host the channel's rendezvous on ``host`` and return its spec for the receivers (see ``join``).

        ``backend`` ``auto``: NCCL when the learner computes on a GPU, else gloo.
        """
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._close_channel()
        self._channel_store, port = host_store(host, world_size, timeout_s)
        spec = ChannelSpec(host=host, port=port, world_size=world_size, backend=backend, bucket_bytes=bucket_bytes,
                           timeout_s=timeout_s, manifest=tuple(tuple(x) for x in self.weight_manifest()))
        self._channel_spec = spec
        return spec.as_dict()

    @collective
    def join_weight_channel(self) -> None:
        """Rank 0 joins the channel opened by :meth:`open_weight_channel`; returns once every receiver joined."""
        if self._channel_spec is None:
            raise RuntimeError("join_weight_channel before open_weight_channel")
        self._channel = WeightChannel(self._channel_spec, 0, store=self._channel_store)

    @collective
    def push_weights(self) -> dict[str, float]:
        """Broadcast the current policy, bucket by bucket, to every receiver; returns the sync's stats."""
        if self._rank != 0:
            # ZeRO-3 gathers each parameter from every rank: the other ranks take part, rank 0 sends.
            for _ in self.iter_weights():
                pass
            return {"version": self._version, "buckets": 0, "bytes": 0, "seconds": 0.0}
        if self._channel is None:
            raise RuntimeError("push_weights without a weight channel (open_weight_channel, join_weight_channel)")
        return send(self._channel, self._version, self.iter_weights()).as_dict()

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._channel_store = None
        self._channel_spec = None

    def get_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(version, state_dict)``: the current policy's full weights on the CPU, keyed like HF's ``state_dict``.

        Tied aliases share one CPU tensor. The tensors have the dtype the policy computes in (bf16 under bf16).
        Loads into a fresh model of the same architecture with ``load_state_dict(strict=True)``. Under ZeRO-3 every
        rank must call it; ranks other than 0 return an empty dict.
        """
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        state: dict[str, torch.Tensor] = {}
        for names, tensor in self.iter_weights():
            if rank0:
                # copy=True: on the CPU .to("cpu") would return the engine's own storage, which the next step
                # overwrites in place.
                cpu = tensor.detach().to("cpu", copy=True)
                for name in names:
                    state[name] = cpu
        return self._version, state

    def distance_from_reference(self) -> float:
        """L2 norm of ``policy - reference`` over all parameters (0.0 until the first update).

        The reference is the frozen reference model (``model.reference``, else the starting weights). With RLOO at
        ``beta == 0`` no reference is kept, so the starting weights are read from ``model_path`` for this call.
        Under ZeRO-3 a collective, like :meth:`get_weights`.
        """
        reference = self.reference
        if reference is None:
            reference = _load_causal_lm(self.model_path, torch_dtypes()[self.model_cfg.dtype],
                                        self.model_cfg.trust_remote_code)
        module = getattr(reference, "module", reference)  # the ZeRO-3 reference is an engine
        ref_params = dict(module.named_parameters(remove_duplicate=False))
        total = 0.0
        for names, tensor in self.iter_weights():
            ref = ref_params.get(names[0])
            if ref is not None:
                with self._gathered(ref) as full:
                    total += (tensor.float() - full.detach().to(tensor.device).float()).square().sum().item()
        return math.sqrt(total)

    def save(self, path: str) -> None:
        """Write the current policy (HF ``save_pretrained``) and its tokenizer to ``path`` (rank 0 writes)."""
        from transformers import AutoTokenizer

        _, state = self.get_weights()
        if not state:
            return
        self.engine.module.save_pretrained(path, state_dict=state)
        tokenizer_path = self.model_cfg.tokenizer or self.model_path
        AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.model_cfg.trust_remote_code
                                      ).save_pretrained(path)
