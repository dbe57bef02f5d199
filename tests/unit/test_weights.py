"""Bucket plans and packing: every tensor lands whole, aligned, in order, and comes back bit for bit."""

import pytest
import torch

from eva_ray.weights import (ALIGN, DTYPES, TensorSpec, dtype_name, manifest_digest, plan_buckets, read_from,
                             spec_of, write_into)


def tensors() -> list[tuple[list[str], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (["embed.weight", "lm_head.weight"], torch.randn(37, 8, generator=g)),
        (["norm.weight"], torch.randn(8, generator=g).to(torch.bfloat16)),
        (["big.weight"], torch.randn(300, 9, generator=g)),  # larger than the small buckets below
        (["half.weight"], torch.randn(5, 3, generator=g).to(torch.float16)),
        (["empty.bias"], torch.zeros(0)),
        (["steps"], torch.arange(7, dtype=torch.int64)),
        (["mask"], torch.tensor([True, False, True])),
    ]


@pytest.mark.parametrize("bucket_bytes", [1, 100, 2048, 1 << 20])
def test_plan_keeps_order_fits_buckets_and_aligns_every_slot(bucket_bytes):
    manifest = [spec_of(n, t) for n, t in tensors()]
    plan = plan_buckets(manifest, bucket_bytes)
    assert [s.index for b in plan for s in b.slots] == list(range(len(manifest)))
    for bucket in plan:
        assert all(s.offset % ALIGN == 0 for s in bucket.slots)
        assert bucket.nbytes == max(s.offset + s.nbytes for s in bucket.slots)
        # Over the limit only when a single tensor is larger than a bucket.
        assert bucket.nbytes <= bucket_bytes or len(bucket.slots) == 1
        ends = [s.offset + s.nbytes for s in bucket.slots]
        assert all(e <= o for e, o in zip(ends, [s.offset for s in bucket.slots][1:]))  # no overlap
    if bucket_bytes == 1 << 20:
        assert len(plan) == 1


def test_pack_and_unpack_round_trip_bit_for_bit_in_every_dtype():
    items = tensors()
    manifest = [spec_of(n, t) for n, t in items]
    plan = plan_buckets(manifest, 512)
    assert len(plan) > 2
    out = []
    for bucket in plan:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8)
        for slot in bucket.slots:
            write_into(buffer, slot, items[slot.index][1])
        out += [(spec, view.clone()) for spec, view in read_from(buffer, bucket, manifest)]
    assert [spec.names for spec, _ in out] == [tuple(n) for n, _ in items]
    for (spec, got), (_, want) in zip(out, items):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_manifest_survives_plain_serialisation_and_its_digest_sees_any_change():
    manifest = [spec_of(n, t) for n, t in tensors()]
    assert [TensorSpec.from_list(s.as_list()) for s in manifest] == manifest
    digest = manifest_digest(manifest)
    assert 0 <= digest < 2**62 and digest == manifest_digest(list(manifest))
    reshaped = [TensorSpec(manifest[0].names, (8, 37), manifest[0].dtype), *manifest[1:]]
    recast = [TensorSpec(manifest[0].names, manifest[0].shape, "bfloat16"), *manifest[1:]]
    assert len({digest, manifest_digest(reshaped), manifest_digest(recast), manifest_digest(manifest[1:])}) == 4


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], 0)
    with pytest.raises(ValueError, match="cannot be sent"):
        dtype_name(torch.complex64)
    with pytest.raises(ValueError, match="not one of"):
        TensorSpec.from_list([["w"], [2], "float8"])
    assert set(DTYPES) >= {"float32", "bfloat16", "float16"}
    assert spec_of(["w"], torch.zeros(0), shape=(4, 2)).shape == (4, 2)  # ZeRO-3: the full shape, not the shard
