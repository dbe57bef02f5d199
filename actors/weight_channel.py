"""The weight channel: learner rank 0 and every rollout engine worker in one process group of their own.

The group is separate from the learner's training group (DeepSpeed's default group): it is built directly from a
``TCPStore`` that learner rank 0 hosts, with gloo on CPU and NCCL on GPUs. Rank 0 is the learner; rollout engine
workers take ranks 1..W (a vLLM engine with tensor parallelism t joins with t ranks, one per worker process).

One sync, after the manifest (names, shapes, dtypes) has been agreed once at set-up:

1. rank 0 broadcasts a header: a magic number, the policy version, the manifest's digest, the bucket count;
2. every rank says whether it accepts the header (a verdict: one small all-reduce);
3. then each bucket, packed as planned by :func:`eva_ray.weights.plan_buckets`, is broadcast as one uint8 tensor,
   and each receiver hands its tensors to its engine as it arrives (no receiver ever holds the whole policy);
4. every rank says whether its part went well (a second verdict).

The control plane (Ray or a direct call) only says "sync now": one call per sync per actor, never per tensor.

Failures behave the same on gloo and NCCL. Every wait has the channel's timeout and raises
:class:`WeightSyncError` when it passes (NCCL's own default would return at once, or tear the process down; see
:func:`nccl_group`). A rank that fails for a reason of its own (a header it rejects, a tensor its engine cannot
load, a learner tensor off the manifest) keeps taking part until the next verdict, where all ranks learn who failed
and why and raise together. A failure of the transport itself (a peer that died, a timeout) closes the channel on
that rank, so its peers' pending collectives fail too; on NCCL they find out by their own timeout.

    store, port = host_store("10.0.0.5", world_size=3, timeout_s=300)          # learner rank 0, first
    channel = WeightChannel(spec, rank=0, store=store)                         # all ranks at once (a collective)
    send(channel, version, learner.iter_weights())                             # rank 0
    version = receive_into(channel, load)                                      # every other rank
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from eva_ray.weights import DTYPES, Bucket, TensorSpec, manifest_digest, plan_buckets, read_from, write_into

_MAGIC = 0x65766152  # "evaR": a receiver that reads anything else is out of step with the sender
_PREFIX = "eva-weights"
_VERDICT = "eva-verdict"


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


# Read by ProcessGroupNCCL when it is constructed. Blocking waits, and no asynchronous error handling: by default
# the group's watchdog tears the whole process down when a collective fails or times out (torch's
# ErrorHandlingMode SkipCleanUp), where the channel must raise WeightSyncError and let the run decide.
NCCL_GROUP_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}


def nccl_group(store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
    """A ProcessGroupNCCL of its own whose failures raise in the caller instead of ending the process.

    The environment is set only while the group is built (it is read then), so the process's other groups
    (DeepSpeed's, vLLM's) keep their own settings.
    """
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    saved = {key: os.environ.get(key) for key in NCCL_GROUP_ENV}
    os.environ.update(NCCL_GROUP_ENV)
    try:
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        self._timeout = timeout
        self._verdicts = 0  # verdicts taken so far; every rank takes them in the same order
        if spec.backend == "nccl":
            self.device = device or torch.device("cuda", torch.cuda.current_device())
            self._pg: Any = nccl_group(prefixed, rank, spec.world_size, timeout)
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
        self._wait(self._pg.broadcast([tensor], opts))

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if self._pg is None:
            raise WeightSyncError("the weight channel is closed (an earlier sync failed); the run must restart it")
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self._wait(self._pg.allreduce([tensor], opts))

    def _wait(self, work: Any) -> None:
        """Block until ``work`` is done, or raise after the channel's timeout.

        The timeout is what makes NCCL behave like gloo here: NCCL's ``wait()`` without one only makes the current
        CUDA stream wait for the collective; the host goes on, and a peer that never joins surfaces later as a hang
        in some unrelated kernel. With a timeout the host blocks and a stalled collective raises.
        """
        work.wait(self._timeout)

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
    """A transport failure: close the channel (peers blocked on it fail at once) and say what failed."""
    channel.close()
    if isinstance(exc, WeightSyncError):
        return exc
    return WeightSyncError(f"weight channel rank {channel.rank}: {what} failed: {type(exc).__name__}: {exc}")


def _role(rank: int) -> str:
    return "the learner" if rank == 0 else "an engine worker"


def _agree(channel: WeightChannel, failure: str | None, stage: str) -> None:
    """Every rank reports whether its part of ``stage`` went well; if any failed, every rank raises, naming why.

    A rank that fails (a receiver rejecting the header, an engine that cannot load a tensor, a learner whose tensor
    does not match the manifest) therefore never leaves its peers blocked in a collective it will not join: it
    keeps taking part until this point, and all ranks stop here together. The reasons travel through the
    channel's store; the verdict itself is one small all-reduce.
    """
    seq = channel._verdicts
    channel._verdicts += 1
    key = f"{_VERDICT}/{seq}/"
    try:
        if failure is not None:
            channel._store.set(key + str(channel.rank), failure[:1000])
        flags = torch.zeros(channel.spec.world_size, dtype=torch.int64, device=channel.device)
        flags[channel.rank] = int(failure is not None)
        channel._all_reduce(flags)
        failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        reasons = [f"rank {r} ({_role(r)}): {channel._store.get(key + str(r)).decode()}" for r in failed]
    except BaseException as exc:
        raise _failing(channel, exc, stage) from exc
    if failed:
        channel.close()  # every rank got here; nobody is left waiting on the group
        raise WeightSyncError(f"weight channel rank {channel.rank}: {stage} failed on " + "; ".join(reasons))


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, WeightSyncError) else f"{type(exc).__name__}: {exc}"


def _pack(channel: WeightChannel, bucket: Bucket, buffer: torch.Tensor, items: Iterator, healthy: bool) -> None:
    """Take the bucket's tensors from ``items`` and (while ``healthy``) write them into ``buffer``.

    After a failure the tensors are still taken but not written: under ZeRO-3 each one is gathered with the other
    learner ranks, which keep iterating until the end.
    """
    for slot in bucket.slots:
        try:
            names, tensor = next(items)
        except StopIteration:
            raise WeightSyncError(f"the learner produced fewer tensors than its manifest lists "
                                  f"({slot.index} of {len(channel.manifest)})") from None
        if not healthy:
            continue
        expected = channel.manifest[slot.index]
        if tuple(names) != expected.names or tuple(tensor.shape) != expected.shape:
            raise WeightSyncError(f"tensor {slot.index} is {list(names)} {tuple(tensor.shape)}; the manifest "
                                  f"agreed at set-up says {list(expected.names)} {expected.shape}")
        write_into(buffer, slot, tensor.to(DTYPES[expected.dtype]))


def send(channel: WeightChannel, version: int, weights: Iterable[tuple[list[str], torch.Tensor]]) -> SyncStats:
    """Rank 0: broadcast the header, then fill and broadcast bucket after bucket from ``weights``.

    ``weights`` yields ``(names, tensor)`` in manifest order, one tensor at a time (a ZeRO-3 gather lives only until
    the next item), so the sender holds at most one bucket beyond the policy itself. A tensor that does not match
    the manifest fails the sync, but only after every bucket went out (zeros from there on) and every rank agreed:
    the receivers are never left waiting for buckets that will not come.
    """
    if channel.rank != 0:
        raise WeightSyncError(f"send is rank 0's job; this is rank {channel.rank}")
    start = time.perf_counter()
    sent = 0
    items = iter(weights)
    failure: str | None = None
    try:
        channel._broadcast(channel._header(version))
        _agree(channel, None, f"the header of version {version}")
        for bucket in channel.plan:
            buffer = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=channel.device)
            try:
                _pack(channel, bucket, buffer, items, healthy=failure is None)
            except Exception as exc:  # the learner's own data: report it at the verdict, keep the stream going
                failure = failure or _describe(exc)
                if not isinstance(exc, WeightSyncError):
                    items = iter(())  # the iterator itself broke (a gather failed): nothing more to take from it
            channel._broadcast(buffer)
            sent += bucket.nbytes
        if failure is None and next(items, None) is not None:
            failure = f"the learner produced more tensors than its manifest lists ({len(channel.manifest)})"
        _agree(channel, failure, f"sending version {version}")
        if channel.device.type == "cuda":
            # The waits above block until each collective is done; this makes the clock's stop explicit anyway, so
            # SyncStats.seconds (perf/sync_mb_per_s) is device time, never the host's enqueue time.
            torch.cuda.synchronize(channel.device)
    except BaseException as exc:
        error = _failing(channel, exc, f"sending version {version}")  # closed already if every rank agreed
        _drain(items)
        if error is exc:
            raise
        raise error from exc
    return SyncStats(version, len(channel.plan), sent, time.perf_counter() - start)


def _drain(items: Iterator) -> None:
    """Run the rest of the learner's tensor stream (ZeRO-3 gathers its peers take part in), ignoring it."""
    try:
        for _ in items:
            pass
    except Exception:  # the stream broke too; the sync's own error is the one to report
        pass


def _receive_header(channel: WeightChannel) -> int:
    if channel.rank == 0:
        raise WeightSyncError("rank 0 sends; it cannot receive")
    header = channel._header()
    try:
        channel._broadcast(header)
    except BaseException as exc:
        raise _failing(channel, exc, "receiving the sync header") from exc
    magic, version, digest, n_buckets = header.tolist()
    failure = None
    if magic != _MAGIC or digest != channel.digest or n_buckets != len(channel.plan):
        failure = (f"the sender's header (magic {magic:#x}, manifest digest {digest}, {n_buckets} buckets) does not "
                   f"match this rank's manifest (digest {channel.digest}, {len(channel.plan)} buckets): the two ends "
                   "disagree on the policy")
    # A rank that rejects the header says so here, before any bucket: the others must not wait for it.
    _agree(channel, failure, f"the header of version {version}")
    return int(version)


class _Buckets:
    """The buckets of one sync as they arrive, counted, so a consumer that stops early can be caught up."""

    def __init__(self, channel: WeightChannel, version: int) -> None:
        self.channel = channel
        self.version = version
        self.received = 0

    def _next(self) -> torch.Tensor:
        bucket = self.channel.plan[self.received]
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.channel.device)
        try:
            self.channel._broadcast(buffer)
        except BaseException as exc:
            raise _failing(self.channel, exc, f"receiving version {self.version}") from exc
        self.received += 1
        return buffer

    def tensors(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        while self.received < len(self.channel.plan):
            bucket = self.channel.plan[self.received]
            yield from read_from(self._next(), bucket, self.channel.manifest)

    def drain(self) -> None:
        while self.received < len(self.channel.plan):
            self._next()


def receive(channel: WeightChannel) -> tuple[int, Iterator[tuple[TensorSpec, torch.Tensor]]]:
    """Any rank but 0: read the header, then return ``(version, tensors)``.

    ``tensors`` receives bucket by bucket as it is iterated and yields ``(spec, tensor)`` views into the bucket just
    received (a fresh buffer per bucket, so a consumer may keep a view until it has copied it). It must be iterated
    to the end: the sender broadcasts every bucket, and the sync's verdict comes after the last. A consumer that
    may fail while loading uses :func:`receive_into`, which keeps taking part after such a failure.
    """
    version = _receive_header(channel)
    buckets = _Buckets(channel, version)

    def tensors() -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        yield from buckets.tensors()
        _agree(channel, None, f"receiving version {version}")

    return version, tensors()


def receive_into(channel: WeightChannel, load: Callable[[Iterator[tuple[TensorSpec, torch.Tensor]]], None]) -> int:
    """Any rank but 0: receive one sync and hand its tensors to ``load`` as they arrive; returns the version.

    If ``load`` raises (or returns before taking every tensor), this rank still receives the remaining buckets and
    then reports the failure at the verdict, so the sender and the other receivers finish the sync and raise the
    same error instead of waiting out the timeout. A failure of the channel itself closes it and raises at once.
    """
    version = _receive_header(channel)
    buckets = _Buckets(channel, version)
    failure = None
    try:
        load(buckets.tensors())
        if buckets.received < len(channel.plan):
            failure = f"the engine stopped reading after {buckets.received} of {len(channel.plan)} buckets"
    except Exception as exc:
        if channel.closed:  # the channel failed under the consumer: nothing left to take part in
            raise
        failure = f"loading version {version}: {_describe(exc)}"
    buckets.drain()
    _agree(channel, failure, f"receiving version {version}")
    return version
