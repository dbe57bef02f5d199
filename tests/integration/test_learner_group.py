"""A learner of 2 DeepSpeed ranks (ZeRO-3, gloo, Ray actors) takes exactly the step one rank takes on the same batch.

The 2-rank group shards the batch into whole prompt groups (unevenly when the count is odd, with a padding rank when
there is a single group); its loss, grad norm and updated weights must equal those of a 1-rank learner in this
process on the whole batch. A hang here would mean the ranks' collectives do not line up.
"""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch

from eva_ray.batching import collate
from eva_ray.config import LearnerConfig, ModelConfig, SolverConfig
from eva_ray.rollouts import Rollout
from eva_ray.tiny import save_tiny_models

pytestmark = pytest.mark.slow
N = 4


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_tiny_models(tmp_path_factory.mktemp("tiny"))["policy"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=4,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def batch_of(prompts: int, seed: int = 0):
    rng = random.Random(seed)
    groups = []
    for p in range(prompts):
        prompt = [rng.randrange(7, 103) for _ in range(rng.randint(6, 12))]
        groups.append([Rollout(f"p{p}", prompt, [rng.randrange(7, 103) for _ in range(rng.randint(8, 20))], "",
                               "length", 0) for _ in range(N)])
    rewards = torch.randn(prompts, N, generator=torch.Generator().manual_seed(seed + 1))
    return collate(groups, rewards, pad_token_id=0)


def learner_kwargs(path: str, algorithm: str, stage: int) -> dict:
    return dict(model_path=path, solver=SolverConfig(algorithm=algorithm, beta=0.1, kl_mode="loss"),
                learner=LearnerConfig(zero_stage=stage, lr=1e-2, micro_batch_size=8, lr_schedule="constant",
                                      warmup_ratio=0.0), model=ModelConfig(), total_steps=4, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(ray, kwargs):
    from actors.learner import Learner
    from launch.handles import RayActor
    from launch.learner_group import LearnerGroup

    port = str(free_port())
    ranks = [RayActor(ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}}
    ).remote(**kwargs), f"learner-{r}") for r in range(2)]
    return LearnerGroup(ranks)


@pytest.mark.parametrize("algorithm,stage,prompts", [("rloo", 3, 8), ("oaif", 3, 7), ("rloo", 3, 1),
                                                     ("rloo", 2, 5)])
def test_two_ranks_take_the_one_rank_step(local_ray, policy_path, algorithm, stage, prompts):
    from actors.learner import Learner
    from launch.handles import gather

    kwargs = learner_kwargs(policy_path, algorithm, stage)
    batches = [batch_of(prompts, seed) for seed in range(2)]
    one = Learner(**kwargs)
    try:
        want = [one.train_step(b) for b in batches]
        _, want_weights = one.get_weights()
    finally:
        one.close()
    group = two_ranks(local_ray, kwargs)
    try:
        got = [gather([group.call("train_step", b)])[0] for b in batches]
        _, got_weights = gather([group.call("get_weights")])[0]
    finally:
        group.shutdown()
    for w, g in zip(want, got):
        assert g["train/updates"] == w["train/updates"] == 1.0
        for key in ("train/loss", "train/grad_norm", "train/sequences", "train/tokens", "train/spread_fraction"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    assert want_weights.keys() == got_weights.keys()
    # 5e-5 is half a percent of one update at lr 1e-2: Adam divides by the gradient's root mean square, so an element
    # whose gradient is float noise in both runs (summed in another order over two ranks) can move a little apart.
    for name, w in want_weights.items():
        assert torch.allclose(got_weights[name], w, atol=5e-5), name
    # The weights moved, so the equality above is not two untouched copies of the start.
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(policy_path).state_dict()
    assert max((want_weights[k] - initial[k]).abs().max().item() for k in want_weights if k in initial) > 1e-4
