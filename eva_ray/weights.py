"""Weights in buckets: the parameter manifest, how it is cut into buckets, and how a bucket is packed and unpacked.

A weight sync sends the policy from the learner to every rollout engine as a few large byte buffers (buckets)
instead of one message per parameter. Both ends compute the same bucket plan from the same manifest, so a sync
carries no per-tensor metadata: the sender writes each tensor's bytes at its planned offset, the receivers read them
back from the same offset.

    manifest = [TensorSpec(("model.embed_tokens.weight", "lm_head.weight"), (103, 64), "float32"), ...]
    plan = plan_buckets(manifest, bucket_bytes=64 << 20)
    buffer = torch.empty(plan[0].nbytes, dtype=torch.uint8)
    write_into(buffer, plan[0].slots[0], tensor)              # sender, one tensor at a time
    for spec, view in read_from(buffer, plan[0], manifest):   # receiver: views into the buffer, no copies
        ...

A tensor larger than ``bucket_bytes`` gets a bucket of its own (a sync must never fail on one big embedding); so a
bucket holds at most ``max(bucket_bytes, largest tensor)`` bytes. Pure torch, no process groups: the transport lives
in ``actors/weight_channel.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from eva_ray.dtypes import TENSOR_DTYPES, torch_dtypes

DTYPES: dict[str, torch.dtype] = torch_dtypes(TENSOR_DTYPES)
"""Dtypes a manifest may name (strings, because a torch.dtype does not survive every RPC serializer)."""

ALIGN = 64
"""Byte alignment of every tensor inside a bucket: a uint8 slice can be viewed as any dtype above at that offset."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"weights of dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the policy: every state-dict name it has (tied weights have several), shape and dtype."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def as_list(self) -> list:
        """A plain form (lists, ints, strings) that any RPC layer carries unchanged."""
        return [list(self.names), list(self.shape), self.dtype]

    @classmethod
    def from_list(cls, item: Sequence) -> TensorSpec:
        names, shape, dtype = item
        if dtype not in DTYPES:
            raise ValueError(f"manifest entry {names}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return cls(tuple(names), tuple(int(d) for d in shape), dtype)


def spec_of(names: Sequence[str], tensor: torch.Tensor, shape: Sequence[int] | None = None) -> TensorSpec:
    """The spec of ``tensor``; ``shape`` overrides its own (ZeRO-3 partitions report their full shape apart)."""
    return TensorSpec(tuple(names), tuple(int(d) for d in (tensor.shape if shape is None else shape)),
                      dtype_name(tensor.dtype))


def manifest_digest(manifest: Sequence[TensorSpec]) -> int:
    """A 62-bit fingerprint of the manifest, sent with every sync so both ends prove they planned the same buckets."""
    h = hashlib.sha256(repr([s.as_list() for s in manifest]).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 2


@dataclass(frozen=True)
class Slot:
    index: int
    """Position of the tensor in the manifest."""
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    slots: tuple[Slot, ...]
    nbytes: int


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(manifest: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Cut the manifest, in order, into buckets of at most ``bucket_bytes`` (or one oversized tensor each).

    Order is kept because the sender produces tensors in manifest order (gathered one at a time under ZeRO-3) and
    must be able to send a bucket as soon as its last tensor is written.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    used = 0
    for i, spec in enumerate(manifest):
        start = _aligned(used)
        if slots and start + spec.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), used))
            slots, start = [], 0
        slots.append(Slot(i, start, spec.nbytes))
        used = start + spec.nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), used))
    return buckets


def write_into(buffer: torch.Tensor, slot: Slot, tensor: torch.Tensor) -> None:
    """Copy ``tensor``'s bytes into its slot of a uint8 ``buffer`` (on any device; the copy casts nothing)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    buffer[slot.offset:slot.offset + slot.nbytes].copy_(flat.view(torch.uint8), non_blocking=True)


def read_from(buffer: torch.Tensor, bucket: Bucket,
              manifest: Sequence[TensorSpec]) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """Each tensor of ``bucket`` as a view into ``buffer`` (valid until the buffer is reused)."""
    for slot in bucket.slots:
        spec = manifest[slot.index]
        raw = buffer[slot.offset:slot.offset + slot.nbytes]
        yield spec, raw.view(DTYPES[spec.dtype]).reshape(spec.shape)


def fingerprint(tensors: Iterator[torch.Tensor]) -> list[float]:
    """Per tensor, the sum and the sum of squares in float64: two copies of a policy agree here iff (to rounding)
    they hold the same values. Cheap enough to check a sync end to end (``learner.verify_sync``)."""
    out: list[float] = []
    for t in tensors:
        d = t.detach().to("cpu", torch.float64)
        out += [float(d.sum()), float(d.square().sum())]
    return out


def fingerprints_match(a: Sequence[float], b: Sequence[float], rel: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))
