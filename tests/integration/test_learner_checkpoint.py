"""The learner's resumable checkpoint on a real DeepSpeed engine (CPU, gloo): a learner restored from it trains on
exactly as the one that wrote it (weights, AdamW moments, LR schedule and version all carried over)."""

from __future__ import annotations

import json

import pytest

from eva_ray.batching import collate
from tests.integration.test_learner import groups, make_learner, max_diff, policy_path, spread_rewards  # noqa: F401

pytestmark = pytest.mark.slow


def batch(groups, shift: float):  # noqa: F811 - the fixture's value
    return collate(groups, (spread_rewards() + shift).tolist(), 0)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_restored_learner_trains_on_exactly_as_the_saved_one(policy_path, groups, tmp_path, stage):  # noqa: F811
    kw = dict(stage=stage, lr=1e-2, total_steps=8, warmup_ratio=0.5, schedule="cosine")
    first = make_learner(policy_path, **kw)
    try:
        for k in range(2):
            first.train_step(batch(groups, k))
        saved = first.save_checkpoint(str(tmp_path / "ckpt"))
        assert saved["version"] == first.version == 2 and saved["bytes"] > 0
        after = [first.train_step(batch(groups, k)) for k in (2, 3)]
        want_version, want = first.get_weights()
        want_lr = first.lr
    finally:
        first.close()
    assert json.loads((tmp_path / "ckpt" / "learner.json").read_text())["version"] == 2

    second = make_learner(policy_path, **kw)
    try:
        _, fresh = second.get_weights()
        assert second.load_checkpoint(str(tmp_path / "ckpt")) == 2 and second.version == 2
        _, restored = second.get_weights()
        assert max_diff(restored, fresh) > 0  # the checkpoint's weights, not the starting ones
        again = [second.train_step(batch(groups, k)) for k in (2, 3)]
        got_version, got = second.get_weights()
        assert got_version == want_version == 4
        assert second.lr == want_lr
        assert [m["train/lr"] for m in again] == [m["train/lr"] for m in after]
        assert [m["train/loss"] for m in again] == [m["train/loss"] for m in after]
        assert max_diff(got, want) == 0.0  # bit-identical: the optimizer's moments were restored too
    finally:
        second.close()


def test_loading_a_folder_that_is_no_checkpoint_is_a_clear_error(policy_path, tmp_path):  # noqa: F811
    learner = make_learner(policy_path)
    try:
        with pytest.raises(FileNotFoundError, match="not a learner checkpoint"):
            learner.load_checkpoint(str(tmp_path))
    finally:
        learner.close()
