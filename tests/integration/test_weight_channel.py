"""The weight channel on real gloo process groups: ranks in threads of this process, as inline runs use them."""

import threading
import time

import pytest
import torch

from actors.weight_channel import (ChannelSpec, WeightChannel, WeightSyncError, host_store, receive, receive_into,
                                   send)
from eva_ray.weights import spec_of


def weights() -> list[tuple[list[str], torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(["embed", "head"], torch.randn(50, 16, generator=g)), (["norm"], torch.randn(16, generator=g)),
            (["proj"], torch.randn(16, 40, generator=g).to(torch.bfloat16)), (["count"], torch.arange(3))]


def run_ranks(world: int, manifest, work, *, bucket_bytes=1024, timeout_s=20.0, receiver_manifest=None):
    """Start ``world`` ranks on threads; ``work(rank, channel)`` runs on each; returns {rank: result or exception}."""
    store, port = host_store("127.0.0.1", world, timeout_s)
    spec = ChannelSpec("127.0.0.1", port, world, "gloo", bucket_bytes, timeout_s,
                       tuple(tuple(s.as_list()) for s in manifest))
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        try:
            mine = spec if rank == 0 or receiver_manifest is None else ChannelSpec(
                **{**spec.as_dict(), "manifest": tuple(tuple(s.as_list()) for s in receiver_manifest)})
            channel = WeightChannel(mine, rank, store=store if rank == 0 else None)
            results[rank] = work(rank, channel)
        except BaseException as exc:  # the test inspects it
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def test_every_receiver_gets_every_tensor_bit_for_bit_in_many_buckets():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]

    def work(rank, channel):
        assert len(channel.plan) >= 3  # 1 KiB buckets: the embedding alone is 3.2 KiB
        if rank == 0:
            return send(channel, 7, iter(items))
        version, tensors = receive(channel)
        return version, [(spec.names, t.clone()) for spec, t in tensors]

    results = run_ranks(3, manifest, work)
    stats = results[0]
    assert stats.version == 7 and stats.buckets >= 3 and stats.bytes >= sum(t.nbytes for _, t in items)
    for rank in (1, 2):
        version, got = results[rank]
        assert version == 7
        assert [names for names, _ in got] == [tuple(n) for n, _ in items]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, items))


def test_receivers_that_planned_another_policy_refuse_the_sync_with_a_clear_error():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]
    other = [spec_of(["embed", "head"], torch.zeros(51, 16)), *manifest[1:]]  # one row more

    def work(rank, channel):
        if rank == 0:
            return send(channel, 1, iter(items))
        return receive(channel)

    results = run_ranks(2, manifest, work, receiver_manifest=other)
    assert isinstance(results[1], WeightSyncError) and "disagree on the policy" in str(results[1])
    assert isinstance(results[0], WeightSyncError)  # the receiver rejected the header at its verdict


def test_a_sender_whose_tensors_differ_from_the_manifest_fails_and_its_receivers_are_released():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]
    renamed = [(["embed", "head"], items[0][1]), (["other"], items[1][1]), *items[2:]]

    def work(rank, channel):
        if rank == 0:
            return send(channel, 2, iter(renamed))
        start = time.monotonic()
        try:
            _, tensors = receive(channel)
            list(tensors)
        except WeightSyncError as exc:
            return exc, time.monotonic() - start
        return None

    results = run_ranks(2, manifest, work, timeout_s=30.0)
    assert isinstance(results[0], WeightSyncError) and "['other']" in str(results[0])
    error, waited = results[1]
    assert isinstance(error, WeightSyncError) and waited < 15  # released by the end verdict, not the timeout


def test_a_closed_channel_says_so_instead_of_hanging():
    manifest = [spec_of(n, t) for n, t in weights()]

    def work(rank, channel):
        channel.close()
        with pytest.raises(WeightSyncError, match="closed"):
            send(channel, 0, iter(weights())) if rank == 0 else receive(channel)
        return True

    assert run_ranks(2, manifest, work) == {0: True, 1: True}


def test_channel_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="backend"):
        ChannelSpec("h", 1, 2, "mpi", 1, 1.0, ())
    with pytest.raises(ValueError, match="at least one receiver"):
        ChannelSpec("h", 1, 1, "gloo", 1, 1.0, ())


# ------------------------------------------------------------------------------ failures, as NCCL now has them too
# gloo raises where NCCL used to hang or kill the process; the channel now gives both the same behaviour (every wait
# has a timeout; a rank that fails keeps taking part until the verdict), and these tests pin that behaviour down.


def test_a_receiver_whose_sender_never_sends_raises_after_the_timeout_instead_of_hanging():
    manifest = [spec_of(n, t) for n, t in weights()]

    def work(rank, channel):
        if rank == 0:
            time.sleep(6)  # alive, but never sends
            return None
        start = time.monotonic()
        try:
            receive(channel)
        except WeightSyncError as exc:
            return exc, time.monotonic() - start, channel.closed
        return None

    results = run_ranks(2, manifest, work, timeout_s=2.0)
    error, waited, closed = results[1]
    assert "receiving the sync header failed" in str(error) and 1.5 < waited < 5 and closed


def test_a_rejecting_receiver_does_not_hang_its_peers_and_every_rank_names_it():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]

    def work(rank, channel):
        if rank == 2:
            channel.digest += 1  # this rank planned another policy: it rejects the header
        start = time.monotonic()
        try:
            if rank == 0:
                send(channel, 4, iter(items))
            else:
                receive_into(channel, lambda tensors: [None for _ in tensors])
        except WeightSyncError as exc:
            return exc, time.monotonic() - start, channel.closed
        return None

    results = run_ranks(3, manifest, work, timeout_s=30.0)
    for rank in range(3):
        error, waited, closed = results[rank]
        # Released by the verdict, not by a broken connection or the 30 s timeout.
        assert "failed on rank 2 (an engine worker)" in str(error) and "disagree on the policy" in str(error)
        assert waited < 10 and closed, (rank, error, waited)


def test_an_engine_that_cannot_load_a_tensor_keeps_taking_part_and_the_sync_fails_on_every_rank():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]

    def work(rank, channel):
        got = []

        def load(tensors):
            for spec, tensor in tensors:
                if rank == 1 and spec.names == ("norm",):
                    raise RuntimeError("no room for norm")
                got.append((spec.names, tensor.clone()))

        start = time.monotonic()
        try:
            if rank == 0:
                send(channel, 5, iter(items))
            else:
                receive_into(channel, load)
        except WeightSyncError as exc:
            return exc, time.monotonic() - start, got
        return None

    results = run_ranks(3, manifest, work, timeout_s=30.0)
    for rank in range(3):
        error, waited, _ = results[rank]
        assert "rank 1 (an engine worker): loading version 5: RuntimeError: no room for norm" in str(error)
        assert waited < 10, (rank, waited)
    # The healthy receiver got the whole policy before the verdict failed the sync.
    _, _, got = results[2]
    assert [names for names, _ in got] == [tuple(n) for n, _ in items]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, items))


def test_a_sync_after_an_agreed_failure_is_refused_clearly():
    items = weights()
    manifest = [spec_of(n, t) for n, t in items]

    def work(rank, channel):
        def fail(tensors):
            raise ValueError("bad engine")

        with pytest.raises(WeightSyncError):
            send(channel, 1, iter(items)) if rank == 0 else receive_into(channel, fail)
        with pytest.raises(WeightSyncError, match="closed"):
            send(channel, 2, iter(items)) if rank == 0 else receive_into(channel, fail)
        return True

    assert run_ranks(2, manifest, work) == {0: True, 1: True}


def test_nccl_groups_are_built_with_blocking_waits_and_without_the_teardown_watchdog(monkeypatch):
    """The settings the NCCL group is built with (the group itself needs GPUs: scripts/gpu_check.py checks it)."""
    import os

    import torch.distributed as dist

    from actors import weight_channel

    seen = {}

    class Recorder:
        class Options:
            pass

        def __init__(self, store, rank, world_size, options):
            seen.update({key: os.environ.get(key) for key in weight_channel.NCCL_GROUP_ENV}, timeout=options._timeout)

    monkeypatch.setattr(dist, "ProcessGroupNCCL", Recorder, raising=False)  # absent from CPU builds of torch
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    import datetime

    weight_channel.nccl_group(None, 0, 2, datetime.timedelta(seconds=7))
    assert seen == {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
                    "timeout": datetime.timedelta(seconds=7)}
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the process's own setting is back
