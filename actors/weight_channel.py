"""The weight channel: learner rank 0 and every rollout engine worker in one process group of their own.

The group is separate from the learner's training group (DeepSpeed's default group): it is built directly from a
``TCPStore`` that learner rank 0 hosts, with gloo on CPU and NCCL on GPUs. Rank 0 is the learner; rollout engine
workers take ranks 1..W (a vLLM engine with tensor parallelism t joins with t ranks, one per worker process).

One sync, after the manifest (names, shapes, dtypes) has been agreed once at set-up:

1. rank 0 broadcasts a header: a magic number, the policy version, the manifest's digest, the bucket count;
2. then each bucket, packed as planned by :func:`eva_ray.weights.plan_buckets`, is broadcast as one uint8 tensor,
   and each receiver hands its tensors to its engine as it arrives (no receiver ever holds the whole policy).

The control plane (Ray or a direct call) only says "sync now": one call per sync per actor, never per tensor.
An error on either side closes the channel so the peers' pending broadcasts fail at once instead of waiting out
the timeout.

    store, port = host_store("10.0.0.5", world_size=3, timeout_s=300)          # learner rank 0, first
    channel = WeightChannel(spec, rank=0, store=store)                         # all ranks at once (a collective)
    send(channel, version, learner.iter_weights())                             # rank 0
    version, tensors = receive(channel)                                        # every other rank
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from eva_ray.weights import DTYPES, Bucket, TensorSpec, manifest_digest, plan_buckets, read_from, write_into

_MAGIC = 0x65766152  # "evaR": a receiver that reads anything else is out of step with the sender
_PREFIX = "eva-weights"


class WeightSyncError(RuntimeError):
    """The channel failed or the two ends disagree about what is being sent."""


def collective(fn: Callable) -> Callable:
    """Mark an actor method that blocks until its peers in another actor join it.

    Run inline (every actor in one process), such a call must not block the caller, or the peer it waits for is
    never started: ``launch.handles.InlineActor`` runs marked methods on a thread of their own.
    """
    fn.__eva_collective__ = True
    return fn


@dataclass(frozen=True)
class ChannelSpec:
    """Everything a rank needs to join the channel; plain values, so any RPC layer carries it unchanged."""

    host: str
    port: int
    world_size: int
    backend: str
    bucket_bytes: int
    timeout_s: float
    manifest: tuple[tuple, ...]
    """:meth:`TensorSpec.as_list` of every tensor, in the order the sender produces them."""

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight channel backend {self.backend!r} is not one of gloo, nccl")
        if self.world_size < 2:
            raise ValueError(f"a weight channel needs the learner and at least one receiver, got {self.world_size}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelSpec:
        return cls(**{**d, "manifest": tuple(tuple(x) for x in d["manifest"])})

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_list(item) for item in self.manifest]


def host_store(host: str, world_size: int, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """Start the rendezvous store on rank 0's machine (a free port) without waiting for the others."""
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, store.port


class WeightChannel:
    """One rank's membership of the channel. Constructing it is a collective: it returns once every rank joined."""

    def __init__(self, spec: ChannelSpec, rank: int, *, store: dist.TCPStore | None = None,
                 device: torch.device | None = None) -> None:
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"weight channel rank {rank} is outside 0..{spec.world_size - 1}")
        self.spec = spec
        self.rank = rank
        self.manifest = spec.specs()
        self.plan: list[Bucket] = plan_buckets(self.manifest, spec.bucket_bytes)
        self.digest = manifest_digest(self.manifest)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if store is None:
            store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False, timeout=timeout)
        self._store = store
        prefixed = dist.PrefixStore(_PREFIX, store)
        if spec.backend == "nccl":
            self.device = device or torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg: Any = dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
        else:
            self.device = torch.device("cpu")
            self._pg = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
        # The first collective proves every rank is connected before anyone relies on the channel.
        self._broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))

    @property
    def closed(self) -> bool:
        return self._pg is None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self._pg is None:
            raise WeightSyncError("the weight channel is closed (an earlier sync failed); the run must restart it")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        """Leave the channel; peers blocked in a broadcast fail at once. Idempotent."""
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # aborting a group whose peers are gone may itself complain; it is closed either way
                pass
        self._store = None

    def _header(self, version: int = 0) -> torch.Tensor:
        return torch.tensor([_MAGIC, version, self.digest, len(self.plan)], dtype=torch.int64, device=self.device)


@dataclass
class SyncStats:
    version: int
    buckets: int
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"version": self.version, "buckets": self.buckets, "bytes": self.bytes, "seconds": self.seconds}


def _failing(channel: WeightChannel, exc: BaseException, what: str) -> WeightSyncError:
    channel.close()
    if isinstance(exc, WeightSyncError):
        return exc
    return WeightSyncError(f"weight channel rank {channel.rank}: {what} failed: {type(exc).__name__}: {exc}")


def send(channel: WeightChannel, version: int, weights: Iterable[tuple[list[str], torch.Tensor]]) -> SyncStats:
    """Rank 0: broadcast the header, then fill and broadcast bucket after bucket from ``weights``.

    ``weights`` yields ``(names, tensor)`` in manifest order, one tensor at a time (a ZeRO-3 gather lives only until
    the next item), so the sender holds at most one bucket beyond the policy itself.
    """
    if channel.rank != 0:
        raise WeightSyncError(f"send is rank 0's job; this is rank {channel.rank}")
    start = time.perf_counter()
    sent = 0
    try:
        channel._broadcast(channel._header(version))
        items = iter(weights)
        for bucket in channel.plan:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=channel.device)
            for slot in bucket.slots:
                expected = channel.manifest[slot.index]
                try:
                    names, tensor = next(items)
                except StopIteration:
                    raise WeightSyncError(f"the learner produced fewer tensors than its manifest lists "
                                          f"({slot.index} of {len(channel.manifest)})") from None
                if tuple(names) != expected.names or tuple(tensor.shape) != expected.shape:
                    raise WeightSyncError(f"tensor {slot.index} is {list(names)} {tuple(tensor.shape)}; the manifest "
                                          f"agreed at set-up says {list(expected.names)} {expected.shape}")
                write_into(buffer, slot, tensor.to(DTYPES[expected.dtype]))
            channel._broadcast(buffer)
            sent += bucket.nbytes
        if next(items, None) is not None:
            raise WeightSyncError(f"the learner produced more tensors than its manifest lists "
                                  f"({len(channel.manifest)})")
    except BaseException as exc:
        raise _failing(channel, exc, f"sending version {version}") from exc
    return SyncStats(version, len(channel.plan), sent, time.perf_counter() - start)


def receive(channel: WeightChannel) -> tuple[int, Iterator[tuple[TensorSpec, torch.Tensor]]]:
    """Any rank but 0: read the header, then return ``(version, tensors)``.

    ``tensors`` receives bucket by bucket as it is iterated and yields ``(spec, tensor)`` views into the bucket just
    received (a fresh buffer per bucket, so a consumer may keep a view until it has copied it). It must be iterated
    to the end: the sender broadcasts every bucket.
    """
    if channel.rank == 0:
        raise WeightSyncError("rank 0 sends; it cannot receive")
    header = channel._header()
    try:
        channel._broadcast(header)
    except BaseException as exc:
        raise _failing(channel, exc, "receiving the sync header") from exc
    magic, version, digest, n_buckets = header.tolist()
    if magic != _MAGIC or digest != channel.digest or n_buckets != len(channel.plan):
        channel.close()
        raise WeightSyncError(f"weight channel rank {channel.rank}: the sender's header (magic {magic:#x}, manifest "
                              f"digest {digest}, {n_buckets} buckets) does not match this rank's manifest (digest "
                              f"{channel.digest}, {len(channel.plan)} buckets): the two ends disagree on the policy")

    def tensors() -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        for bucket in channel.plan:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=channel.device)
            try:
                channel._broadcast(buffer)
            except BaseException as exc:
                raise _failing(channel, exc, f"receiving version {version}") from exc
            yield from read_from(buffer, bucket, channel.manifest)

    return int(version), tensors()

