"""Starting the actors: on a Ray cluster (joined or started), or inline as plain objects.

Under ``ray job submit`` the job's driver finds the cluster through ``RAY_ADDRESS``; run alone, the driver starts a
local Ray instance (dashboard off, so nothing listens beyond this process) and stops it at the end. Rollout workers
are placed through a placement group with the configured strategy (``SPREAD`` puts them on different nodes), and the
node of every worker is recorded in the run's summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.creator import Creator
from actors.learner import Learner
from actors.reward import RewardActor
from actors.rollout import RolloutWorker
from eva_ray.atomic import staged_dir
from eva_ray.config import Config
from eva_ray.records import PromptRecord
from launch import weight_sync
from launch.rollout_group import RolloutGroup
from launch.handles import ActorHandle, InlineActor, RayActor, gather
from launch.learner_group import LearnerGroup
from launch.placement import PlacementError, learner_address, realize
from launch.plan import Plan, PlanError, Target, make_plan, ray_cluster_gpus, uses_gpus
from launch.threads import thread_count, thread_env, with_threads

# Set for every actor. Per-actor runtime_env fields merge with a job's (its working_dir stays), so this also holds
# under `ray job submit`. No network fetch of LiteLLM's price table; no progress bars from every actor's loads.
ACTOR_ENV = {"TOKENIZERS_PARALLELISM": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class ClusterError(RuntimeError):
    """The cluster cannot host the configured actors."""


def actor_kwargs(cfg: Config, train: list[PromptRecord], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Constructor arguments of every role, from the config alone (the same inline and under Ray)."""
    model_path = cfg.model.path
    r = cfg.rollout
    return {
        "rollout": dict(model_path=model_path, backend=r.backend, tokenizer_path=cfg.model.tokenizer,
                        dtype=cfg.model.dtype, temperature=r.temperature, top_p=r.top_p,
                        max_new_tokens=r.max_new_tokens, max_prompt_tokens=r.max_prompt_tokens, seed=cfg.run.seed,
                        static_cache=r.static_cache, gpu_memory_utilization=r.gpu_memory_utilization,
                        trust_remote_code=cfg.model.trust_remote_code, tensor_parallel_size=r.tensor_parallel_size,
                        enforce_eager=r.enforce_eager, kv_cache_bytes=r.kv_cache_bytes, max_model_len=r.max_model_len,
                        enable_chunked_prefill=r.enable_chunked_prefill,
                        enable_prefix_caching=r.enable_prefix_caching, enable_sleep_mode=r.enable_sleep_mode,
                        vllm_multiprocessing=r.vllm_multiprocessing),
        "reward": dict(backend=cfg.reward.backend, model=cfg.reward.model, function=cfg.reward.function,
                       trust_remote_code=cfg.reward.trust_remote_code, batch_size=cfg.reward.batch_size,
                       max_length=cfg.reward.max_length, dtype=cfg.reward.dtype, revision=cfg.reward.revision),
        "creator": dict(cfg=cfg, seed_prompts=train, run_dir=str(run_dir)),
        # The learner takes log-probs at the temperature the responses were sampled with.
        "learner": dict(model_path=model_path, solver=cfg.solver, learner=cfg.learner, model=cfg.model,
                        total_steps=cfg.run.total_steps, seed=cfg.run.seed, temperature=r.temperature),
    }


@dataclass
class System:
    """The running actors and the little state the driver keeps about them."""

    creator: ActorHandle
    rollout: RolloutGroup
    reward: ActorHandle
    learner: ActorHandle
    pad_token_id: int
    learner_version: int = 0
    synced_version: int = 0
    """The version the rollout group holds: a step that applied no update leaves the two equal, and needs no sync."""
    rollout_nodes: list[str] = field(default_factory=list)
    stop_ray: bool = False
    placement: list[dict[str, Any]] = field(default_factory=list)
    """Where each actor of the plan landed (plan node, GPUs, Ray node id): empty inline."""
    placement_groups: Any = None
    verify_sync: bool = False
    """After every sync, compare the workers' weights with the learner's (``learner.verify_sync``)."""
    sync_timeout_s: float = 300.0

    def connect_weights(self, cfg: Config, host: str) -> None:
        """Open the weight channel between the learner (at ``host``) and every rollout worker."""
        self.sync_timeout_s = cfg.learner.sync_timeout_s
        self.verify_sync = cfg.learner.verify_sync
        self._channel_args = dict(bucket_bytes=max(1, int(cfg.learner.sync_bucket_mb * (1 << 20))),
                                  timeout_s=cfg.learner.sync_timeout_s, backend=cfg.learner.sync_backend)
        self._channel_host = host
        self._manifest = weight_sync.connect(self.learner, self.rollout.workers, host, **self._channel_args)["manifest"]

    def reconnect_weights(self) -> None:
        """Build the weight channel again (a rollout worker restarted); the next sync then always runs."""
        weight_sync.reconnect(self.learner, self.rollout.workers, self._channel_host, **self._channel_args)
        self.synced_version = -1  # a restarted worker holds the starting weights, whatever the others hold

    def sync_weights(self, *, expect_version: bool = True) -> dict[str, float]:
        """Stream the learner's current weights to the rollout group over the channel; returns the sync's stats.

        ``expect_version=False``: the learner may be ahead of ``learner_version`` (a worker restarted while the
        overlapped loop had a train step in flight); the workers take whatever version it sends."""
        stats = weight_sync.sync(self.learner, self.rollout.workers,
                                 self.learner_version if expect_version else None, self.sync_timeout_s)
        self.synced_version = int(stats["version"])
        if self.verify_sync:
            weight_sync.verify(self.learner, self.rollout.workers, self._manifest)
            stats["verified"] = 1.0
        return stats

    def finish(self, run_dir: Path) -> dict[str, Any]:
        """Wait briefly for in-flight evolving, save the buffer and the policy, and collect the end-of-run facts.

        Every step is guarded: one that fails (a dead actor) is listed in ``finish_errors`` and the others still
        run, so a dead creator does not cost the saved policy, and the run's own first error stays the one reported.
        """
        errors: list[str] = []

        def ask(handle: ActorHandle, method: str, *args: Any, default: Any = None) -> Any:
            try:
                return gather([handle.call(method, *args)])[0]
            except Exception as exc:  # noqa: BLE001 - recorded; the remaining steps must still run
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                errors.append(f"{handle.name}.{method}: {type(exc).__name__}: {first}"[:500])
                return default

        still_running = ask(self.creator, "drain", 30.0)
        ask(self.creator, "snapshot", str(run_dir / "buffer.json"))
        try:  # the policy folder is replaced only once complete: a full disk keeps the previous one
            with staged_dir(run_dir / "policy", create=False) as staging:  # save_pretrained makes the folder
                gather([self.learner.call("save", str(staging))])
        except Exception as exc:  # noqa: BLE001 - recorded like the other steps
            errors.append(f"{self.learner.name}.save: {type(exc).__name__}: {str(exc).strip()[:300]}")
        stats = ask(self.creator, "stats", default={"buffer": {}, "creator": {}})
        records = ask(self.creator, "buffer_records", default=[])
        final = {
            "buffer_by_generation_and_difficulty": _composition(records),
            "evolve_tasks_unfinished": still_running,
            "buffer": {k: v for k, v in stats["buffer"].items() if not k.endswith("_hist")},
            "creator": stats["creator"],
            "provider": ask(self.creator, "provider_stats", default={}),
            "learner_version": self.learner_version,
            "rollout_nodes": self.rollout_nodes,
            "placement": self.placement,
        }
        weight_change = ask(self.learner, "distance_from_reference")
        if weight_change is not None:
            final["weight_change"] = weight_change
        if errors:
            final["finish_errors"] = errors
        return final

    def shutdown(self) -> None:
        for handle in [self.creator, self.reward, self.learner, *self.rollout.workers]:
            try:
                handle.shutdown()
            except Exception as exc:  # one actor failing to close must not keep the others alive
                print(f"eva-ray: {handle.name} did not close cleanly: {exc}")
        if self.placement_groups is not None:  # on a cluster that outlives the run, give its resources back
            self.placement_groups.remove()
        if self.stop_ray:
            import ray

            ray.shutdown()


def _composition(records: list[dict[str, Any]]) -> dict[str, int]:
    """Buffer prompts counted by ``g<generation>/d<difficulty>`` (difficulty only in worlds)."""
    counts: dict[str, int] = {}
    for r in records:
        key = f"g{r['generation']}" + (f"/d{r['meta']['difficulty']}" if "difficulty" in r["meta"] else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _pad_token_id(cfg: Config) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ClusterError(f"tokenizer of {cfg.model.tokenizer or cfg.model.path} has neither a pad nor an eos token")
    return pad


def _check_supported(cfg: Config, inline: bool) -> None:
    if cfg.resources.reward.num_workers != 1:
        raise ClusterError(f"resources.reward.num_workers: {cfg.resources.reward.num_workers}; this version runs "
                           "exactly one reward actor")
    if inline and cfg.resources.learner.num_workers != 1:
        raise ClusterError(f"resources.learner.num_workers: {cfg.resources.learner.num_workers} with --inline; a "
                           "process holds one DeepSpeed rank, so several ranks need Ray (drop --inline)")
    if cfg.learner.reference_placement == "actor":
        raise ClusterError("learner.reference_placement: 'actor' is planned (eva-ray plan) but not launched by this "
                           "version; use 'learner' (the reference is sharded on the learner ranks under ZeRO-3)")


def start_system(cfg: Config, train: list[PromptRecord], run_dir: Path, *, inline: bool,
                 echo: Callable[[str], None] = print) -> System:
    _check_supported(cfg, inline)
    kwargs = actor_kwargs(cfg, train, run_dir)
    pad = _pad_token_id(cfg)
    if inline:
        if cfg.rollout.backend == "vllm" and cfg.rollout.vllm_multiprocessing is None:
            # An in-process vLLM engine sets up torch.distributed and the torch thread count for the whole process,
            # which the learner shares when inline: keep the engine in processes of its own.
            kwargs["rollout"]["vllm_multiprocessing"] = True
        n = cfg.resources.rollout.num_workers
        workers = [InlineActor(RolloutWorker(**kwargs["rollout"], worker_index=i), f"rollout-{i}") for i in range(n)]
        system = System(
            creator=InlineActor(Creator(**kwargs["creator"]), "creator"),
            rollout=RolloutGroup(workers),
            reward=InlineActor(RewardActor(**kwargs["reward"]), "reward"),
            learner=InlineActor(Learner(**kwargs["learner"]), "learner"),
            pad_token_id=pad,
        )
        _connect_or_shut_down(system, cfg, "127.0.0.1")
        return system
    return _start_on_ray(cfg, kwargs, pad, echo)


def _connect_or_shut_down(system: System, cfg: Config, host: str) -> None:
    try:
        system.connect_weights(cfg, host)
    except BaseException as exc:
        system.stop_ray = False  # the caller shuts a Ray it started down once
        system.shutdown()
        raise ClusterError(f"the weight channel could not be set up: {exc}") from exc


def connect_ray(echo: Callable[[str], None] = print) -> bool:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one; True if started."""
    # Without this, a node started at 127.0.0.1 still binds the machine's outside address, and a driver on the
    # loopback address waits forever for its GCS. Ray reads it when it is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        _check_reachable(os.environ["RAY_ADDRESS"])
        try:
            ray.init(address="auto", log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}: "
                               f"{' '.join(str(exc).split())[:300]}") from exc
        echo(f"eva-ray: joined the Ray cluster at {os.environ['RAY_ADDRESS']}")
        return False
    # address="local": always a fresh instance, never a stale cluster some earlier process left registered.
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    echo("eva-ray: started a local Ray instance")
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` RAY_ADDRESS that nothing answers on is one clear error now, not minutes of GCS retries."""
    import socket

    target = address.removeprefix("ray://")
    if target in ("auto", "local") or target.startswith(("http://", "https://")) or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster answers at RAY_ADDRESS={address} ({type(exc).__name__}: {exc}); start "
                           "one with `ray start --head`, or unset RAY_ADDRESS to run on a local instance") from exc


def _start_on_ray(cfg: Config, kwargs: dict[str, dict[str, Any]], pad: int, echo: Callable[[str], None]) -> System:
    started = connect_ray(echo)  # first: it sets what Ray must read when it is first imported
    import ray

    try:
        return _place_actors(cfg, kwargs, pad, echo, started)
    except BaseException:  # an error or Ctrl-C while actors start: a Ray we started must not outlive the driver
        if started:
            ray.shutdown()
        raise


def _place_actors(cfg: Config, kwargs: dict[str, dict[str, Any]], pad: int, echo: Callable[[str], None],
                  started: bool) -> System:
    import ray

    res = cfg.resources
    plan = _launch_plan(cfg)
    try:
        placed = realize(plan, echo)
    except PlacementError as exc:
        raise ClusterError(str(exc)) from exc

    def remote(cls, r, role: str, index: int = 0, env: dict[str, str] | None = None, **options):
        threads = thread_count(r)  # torch threads = the CPUs the actor was given (launch/threads.py)
        # The GPUs the plan gives the actor's own process (a tensor-parallel engine's go to vLLM's workers).
        return ray.remote(with_threads(cls, threads, cfg.run.plugins)).options(
            num_cpus=r.num_cpus, num_gpus=plan.placement(role, index).actor_gpus,
            runtime_env={"env_vars": {**ACTOR_ENV, **thread_env(threads), **(env or {})}},
            scheduling_strategy=placed.strategy(role, index), **options)

    # A rollout worker or the reward actor that dies is started again by Ray; the driver rebuilds the weight channel
    # and retries the step's call. The learner and the creator hold the run's state: their death stops the run.
    restartable = dict(max_restarts=res.max_restarts, max_task_retries=0)
    n = res.rollout.num_workers
    nodes = [placed.node_of("rollout", i) for i in range(n)]
    workers = [RayActor(remote(RolloutWorker, res.rollout, "rollout", i, env=engine_env(cfg, plan, i),
                               **restartable).remote(**engine_kwargs(cfg, plan, kwargs["rollout"]), worker_index=i),
                        f"rollout-{i}") for i in range(n)]
    # Learner ranks meet at rank 0's node; each sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so its
    # local rank is 0.
    ranks = res.learner.num_workers
    master, port = learner_address(placed)
    learners = [RayActor(remote(Learner, res.learner, "learner", i, env={
        "MASTER_ADDR": master, "MASTER_PORT": str(port), "RANK": str(i), "WORLD_SIZE": str(ranks),
        "LOCAL_RANK": "0"}).remote(**kwargs["learner"]), f"learner-{i}") for i in range(ranks)]
    system = System(
        creator=RayActor(remote(Creator, res.creator, "creator").remote(**kwargs["creator"]), "creator"),
        rollout=RolloutGroup(workers),
        reward=RayActor(remote(RewardActor, res.reward, "reward", **restartable).remote(**kwargs["reward"]), "reward"),
        learner=LearnerGroup(learners) if ranks > 1 else learners[0],
        pad_token_id=pad, rollout_nodes=nodes, stop_ray=started, placement=placed.layout(), placement_groups=placed,
    )
    # Constructors run asynchronously; wait for all of them so a failing one is reported now, by name.
    for handle in [system.creator, system.reward, *learners, *workers]:
        try:
            gather([handle.call("__ray_ready__")])
        except Exception as exc:
            system.stop_ray = False  # the caller shuts Ray down once
            system.shutdown()
            raise ClusterError(f"the {handle.name} actor failed to start: {exc}") from exc
    echo(f"eva-ray: {ranks} learner rank(s), {n} rollout worker(s) on {len(set(nodes))} node(s)")
    # The channel's rendezvous lives where learner rank 0 runs; every engine worker connects to that address.
    _connect_or_shut_down(system, cfg, master)
    return system


def _tensor_parallel_on_gpus(cfg: Config, plan: Plan) -> bool:
    return (cfg.rollout.backend == "vllm" and cfg.rollout.tensor_parallel_size > 1
            and bool(plan.placement("rollout", 0).gpus))


def engine_kwargs(cfg: Config, plan: Plan, rollout: dict[str, Any]) -> dict[str, Any]:
    """The rollout worker's arguments under Ray: a tensor-parallel engine uses the executor its bundles were made
    for (``rollout.tensor_parallel_executor``, see ``launch.plan.engine_bundles``)."""
    if not _tensor_parallel_on_gpus(cfg, plan):
        return rollout
    return {**rollout, "distributed_executor_backend": cfg.rollout.tensor_parallel_executor}


def engine_env(cfg: Config, plan: Plan, index: int) -> dict[str, str]:
    """``VLLM_RAY_BUNDLE_INDICES``: which bundles of the engine's group vLLM's Ray workers take, rank by rank."""
    if not _tensor_parallel_on_gpus(cfg, plan) or cfg.rollout.tensor_parallel_executor != "ray":
        return {}
    return {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, plan.placement("rollout", index).bundle_indices))}


def _launch_plan(cfg: Config) -> Plan:
    """The plan for the cluster this driver joined: its real nodes and GPUs when the config asks for GPUs."""
    target = Target(cfg.cluster.nodes, 0, cfg.cluster.gpu_memory_gb, "config")
    if uses_gpus(cfg):
        nodes, gpus = ray_cluster_gpus()
        target = Target(nodes, gpus, cfg.cluster.gpu_memory_gb, "the Ray cluster")
    try:
        plan = make_plan(cfg, target)
    except PlanError as exc:
        raise ClusterError(f"the layout does not fit the Ray cluster: {exc}") from exc
    if not plan.fits:
        raise ClusterError(f"the layout does not fit the Ray cluster: {plan.error_line()}")
    return plan
