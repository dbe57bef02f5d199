"""Where every actor goes, and whether its GPU memory fits, before anything starts.

    eva-ray plan --config configs/gemma2-9b-rloo-8xh100.yaml                     # the target the config names
    eva-ray plan --config configs/gemma2-9b-rloo-8xh100.yaml --gpus-per-node 4 --nodes 2
    eva-ray plan --config F resources.learner.num_workers=1 --gpu-memory-gb 141   # does the learner fit one H200?

The layout rule, in order: learner ranks are packed onto the first node(s), one GPU each; the reference model is
sharded on the learner ranks (or, with ``learner.reference_placement: actor``, takes the next free GPU); reward
models take the next free GPU(s); rollout engines fill the GPUs left, each engine's ``tensor_parallel_size`` GPUs on
one node (``resources.placement`` decides whether engines pack onto the fewest nodes or spread); the creator runs
on CPU. Running out of GPUs, or a GPU whose estimate (:mod:`eva_ray.memory`) exceeds its memory, is an overflow:
the command prints the table and one line naming it, and exits 1. ``eva-ray run`` makes the same check first when a
config asks for GPUs.

The plan is data (:class:`Plan`): per actor its role, index, node, GPUs and bundle, and the placement groups
(bundles and strategy) it implies, so a launch can follow it and a test can compare a real placement with it. Node
and GPU numbers are the plan's own: node 0 is the first node the layout uses, GPU k the k-th GPU on it.

The target comes from the config's ``cluster`` section, then from the Ray cluster named by ``RAY_ADDRESS`` (its
nodes and GPUs; the memory per GPU still comes from the config), then from command-line flags, each overriding the
one before.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eva_ray import memory
from eva_ray.config import Config
from eva_ray.losses import get_loss
from eva_ray.memory import GB, Estimate, LearnerSetup, ModelShape, ShapeError

REPO_MODEL_SHAPES = Path(__file__).resolve().parents[1] / "configs" / "models"


class PlanError(ValueError):
    """A layout that cannot be planned or does not fit; the message is one line."""


@dataclass(frozen=True)
class Target:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    source: str = "config"

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_memory_gb * GB


@dataclass(frozen=True)
class Placement:
    """One actor: ``node`` and ``gpus`` are None / empty for an actor Ray may put on any node's CPUs."""

    role: str
    index: int
    node: int | None
    gpus: tuple[int, ...]
    group: str | None
    bundle_indices: tuple[int, ...]
    actor_gpus: float = 0.0
    """GPUs the actor's own process asks Ray for. 0 for a tensor-parallel vLLM engine on the ray executor: its GPUs
    are the bundles of its group, one per vLLM worker (``bundle_indices``), which vLLM's Ray workers take."""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass(frozen=True)
class BundleGroup:
    """A Ray placement group: its bundles (resource dicts) in order, and its strategy."""

    name: str
    bundles: tuple[dict[str, float], ...]
    strategy: str


@dataclass
class GpuUse:
    node: int
    gpu: int
    actor: str
    estimate: Estimate
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    target: Target
    placements: list[Placement]
    groups: list[BundleGroup]
    gpus: list[GpuUse]
    overflows: list[str]
    notes: list[str] = field(default_factory=list)
    """Lines printed under the memory table (the checkpoint size)."""

    @property
    def fits(self) -> bool:
        return not self.overflows

    def placement(self, role: str, index: int = 0) -> Placement:
        for p in self.placements:
            if p.role == role and p.index == index:
                return p
        raise KeyError(f"{role}-{index}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a run's summary can record and a test can compare."""
        return {
            "target": vars(self.target).copy(),
            "placements": [{"role": p.role, "index": p.index, "node": p.node, "gpus": list(p.gpus),
                            "group": p.group, "bundle_indices": list(p.bundle_indices), "actor_gpus": p.actor_gpus}
                           for p in self.placements],
            "groups": [{"name": g.name, "bundles": [dict(b) for b in g.bundles], "strategy": g.strategy}
                       for g in self.groups],
            "gpus": [{"node": u.node, "gpu": u.gpu, "actor": u.actor, "total_gb": round(u.estimate.total / GB, 2),
                      **{f"{k}_gb": round(v / GB, 2) for k, v in u.estimate.terms.items()}} for u in self.gpus],
            "fits": self.fits,
            "overflows": list(self.overflows),
        }

    def error_line(self) -> str:
        """One line naming the worst overflow and how many more there are."""
        if not self.overflows:
            return ""
        more = len(self.overflows) - 1
        return self.overflows[0] + (f" (and {more} more)" if more else "")


# --------------------------------------------------------------------------------------------------- model shapes


def find_model_shape(path: str | None, *, search: tuple[Path, ...] = ()) -> ModelShape:
    """A model's shape from its ``config.json``: a local folder, a config file, a tiny model, or a shipped shape.

    Shipped shapes live in ``configs/models/<name>/config.json``, found by the last part of a hub id
    (``google/gemma-2-9b-it`` -> ``gemma-2-9b-it``).
    """
    if not path:
        raise ShapeError("no model path to read a shape from")
    if path.startswith("tiny:"):
        from eva_ray.tiny import CHARACTERS, SPECIAL_TOKENS, tiny_llama_config

        cfg = tiny_llama_config(len(SPECIAL_TOKENS) + len(CHARACTERS)).to_dict()
        if path == "tiny:reward":
            cfg["architectures"] = ["LlamaForSequenceClassification"]
        return ModelShape.from_hf_config(cfg, path)
    local = Path(path)
    if local.is_file():
        return ModelShape.from_config_file(local)
    if (local / "config.json").is_file():
        return ModelShape.from_config_file(local / "config.json", local.name)
    name = path.rstrip("/").split("/")[-1]
    for root in (*search, Path.cwd() / "configs" / "models", REPO_MODEL_SHAPES):
        candidate = root / name / "config.json"
        if candidate.is_file():
            return ModelShape.from_config_file(candidate, name)
    raise ShapeError(f"no config.json for model {path!r}: give a local model folder, or add "
                     f"configs/models/{name}/config.json with its architecture numbers")


# ------------------------------------------------------------------------------------------------------- targets


def resolve_target(cfg: Config, *, nodes: int | None = None, gpus_per_node: int | None = None,
                   gpu_memory_gb: float | None = None, ray_cluster: bool = True) -> Target:
    """The config's cluster, replaced by the Ray cluster's nodes when RAY_ADDRESS names one, then by flags."""
    target = Target(cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.cluster.gpu_memory_gb, "config")
    if ray_cluster and os.environ.get("RAY_ADDRESS") and nodes is None and gpus_per_node is None:
        n, g = ray_cluster_gpus()
        target = Target(n, g, target.gpu_memory_gb, f"ray cluster at {os.environ['RAY_ADDRESS']}")
    if nodes is not None or gpus_per_node is not None or gpu_memory_gb is not None:
        target = Target(nodes if nodes is not None else target.nodes,
                        gpus_per_node if gpus_per_node is not None else target.gpus_per_node,
                        gpu_memory_gb if gpu_memory_gb is not None else target.gpu_memory_gb, "command line")
    return target


def ray_cluster_gpus() -> tuple[int, int]:
    """(nodes with GPUs, fewest GPUs on one of them) of the cluster this process joins; (alive nodes, 0) if none."""
    from launch.cluster import connect_ray

    import sys

    connect_ray(echo=lambda line: print(line, file=sys.stderr))
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    gpus = [int(n["Resources"].get("GPU", 0)) for n in alive if n["Resources"].get("GPU", 0) >= 1]
    return (len(gpus), min(gpus)) if gpus else (max(1, len(alive)), 0)


# -------------------------------------------------------------------------------------------------------- layout


def uses_gpus(cfg: Config) -> bool:
    r = cfg.resources
    return any(getattr(r, role).num_gpus > 0 for role in ("rollout", "reward", "creator", "learner"))


def _whole_gpus(cfg: Config, role: str) -> int:
    g = getattr(cfg.resources, role).num_gpus
    if g and g != int(g):
        raise PlanError(f"resources.{role}.num_gpus: {g}; the plan gives each actor whole GPUs "
                        "(GPU sharing is not planned)")
    return int(g)


@dataclass(frozen=True)
class LearnerLoad:
    """What one learner micro-batch holds: the sequences it trains on and the models beside the policy."""

    seq_len: int
    logit_tokens: int
    """Positions per sequence whose logits are kept (the response's, plus the one that predicts its first token)."""
    micro_batch: int
    """Sequences per forward/backward."""
    reference: bool
    optimizer: str
    note: str = ""


def learner_load(cfg: Config) -> LearnerLoad:
    """Online: rollouts of ``rollout.max_prompt_tokens + max_new_tokens`` under ``solver.beta``. Offline: preference
    pairs of the recipe's ``max_length`` (:func:`eva_ray.offline.recipe.resolve_recipe`, the loss's defaults where
    ``offline.*`` is unset), the reference only where the loss reads it at the recipe's beta (not SimPO / ORPO), and
    no micro-batch larger than one optimizer update's sequences (two per pair)."""
    spec = get_loss(cfg.solver.algorithm)
    if cfg.run.mode != "offline":
        return LearnerLoad(cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens, cfg.rollout.max_new_tokens + 1,
                           cfg.learner.micro_batch_size, spec.needs_reference(cfg.solver.beta), "adamw")
    from eva_ray.offline.recipe import resolve_recipe

    r = resolve_recipe(cfg)
    micro = min(cfg.learner.micro_batch_size, 2 * r.batch_size)
    reference = spec.needs_reference(r.beta)
    note = (f"offline {spec.name}: the learner trains pairs of up to {r.max_length} tokens "
            f"({r.max_length - r.max_prompt_length} of response), {micro} sequences per micro-batch, "
            f"{r.batch_size} pairs per update, {r.optimizer}, {'with' if reference else 'no'} reference model")
    return LearnerLoad(r.max_length, r.max_length - r.max_prompt_length + 1, micro, reference, r.optimizer, note)


class _Gpus:
    """Free GPUs per node, handed out in order."""

    def __init__(self, target: Target):
        self.free = [list(range(target.gpus_per_node)) for _ in range(target.nodes)]
        self.total = target.nodes * target.gpus_per_node
        self.taken: dict[str, int] = {}

    def take(self, actor: str, count: int, node: int) -> tuple[int, tuple[int, ...]]:
        gpus = tuple(self.free[node][:count])
        del self.free[node][:count]
        role = actor.split(" ")[0]
        self.taken[role] = self.taken.get(role, 0) + count
        return node, gpus

    def first_fit(self, count: int, exclude: set[int] = frozenset()) -> int | None:
        return next((i for i, f in enumerate(self.free) if len(f) >= count and i not in exclude), None)

    def roomiest(self, count: int, exclude: set[int] = frozenset()) -> int | None:
        nodes = [i for i, f in enumerate(self.free) if len(f) >= count and i not in exclude]
        return max(nodes, key=lambda i: (len(self.free[i]), -i)) if nodes else None

    def shortage(self, role: str, count: int) -> PlanError:
        used = ", ".join(f"{k} {v}" for k, v in self.taken.items()) or "nothing yet"
        return PlanError(f"{role} needs {count} GPU(s) on one node and none are left: the target has "
                         f"{self.total} GPU(s) ({len(self.free)} node(s)), already taken: {used}")


def engine_bundles(cpus: dict[str, float], tp: int, gpus_per_rank: int, executor: str
                   ) -> tuple[tuple[dict[str, float], ...], float]:
    """The placement-group bundles of one tensor-parallel vLLM engine, and the GPUs its actor itself holds.

    ``ray`` (vLLM's RL examples, and what its Ray executor checks): one bundle of one GPU per tensor-parallel rank,
    the engine's actor on bundle 0 holding no GPU, vLLM's Ray workers on bundles ``0..tp-1``
    (``VLLM_RAY_BUNDLE_INDICES``). An actor that held a GPU itself would leave bundle 0 without one for its worker,
    and would see one device where vLLM's default executor needs ``tp``. ``mp``: one bundle with all ``tp`` GPUs,
    held by the actor, whose multiprocess executor starts one worker per GPU it sees.
    """
    if not gpus_per_rank:  # a CPU plan: no GPU to give out
        return (cpus,) * tp, 0.0
    if executor == "mp":
        return ({**cpus, "GPU": float(tp)},), float(tp)
    return ({**cpus, "GPU": 1.0},) + ({"GPU": 1.0},) * (tp - 1), 0.0


def _strategy_for(nodes: list[int | None]) -> str:
    return "STRICT_PACK" if len(set(nodes)) <= 1 else "PACK"


def make_plan(cfg: Config, target: Target) -> Plan:
    """Place every actor on ``target`` and estimate each GPU's memory (see the module docstring for the rule)."""
    res = cfg.resources
    on_gpu = uses_gpus(cfg)
    if on_gpu and target.gpus_per_node < 1:
        raise PlanError(f"the config asks for GPUs but the target has none ({target.nodes} node(s) x "
                        f"{target.gpus_per_node} GPUs, from {target.source}); set cluster.gpus_per_node or "
                        "--gpus-per-node")
    gpus = _Gpus(target)
    placements: list[Placement] = []
    groups: list[BundleGroup] = []
    uses: list[GpuUse] = []
    seq_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens  # what the engines and HF rollouts hold
    load = learner_load(cfg)
    shapes: dict[str, ModelShape] = {}

    def shape(path: str | None) -> ModelShape:
        key = str(path)
        if key not in shapes:
            try:
                shapes[key] = find_model_shape(path)
            except ShapeError as exc:
                raise PlanError(str(exc)) from None
        return shapes[key]

    def cpu_bundle(r) -> dict[str, float]:
        return {"CPU": r.num_cpus}

    # Learner ranks: one GPU each, packed from node 0.
    n_learn = res.learner.num_workers
    learner_gpus = _whole_gpus(cfg, "learner")
    if learner_gpus > 1:
        raise PlanError(f"resources.learner.num_gpus: {learner_gpus}; each learner rank drives one GPU "
                        "(allowed: 0 or 1; add ranks with resources.learner.num_workers)")
    ref_mode = "none"
    if load.reference:
        ref_mode = "actor" if cfg.learner.reference_placement == "actor" else "sharded"
    learn_nodes = []
    for i in range(n_learn):
        node, got = None, ()
        if learner_gpus:
            node = gpus.first_fit(1)
            if node is None:
                raise gpus.shortage(f"learner rank {i}", 1)
            node, got = gpus.take(f"learner rank {i}", 1, node)
        learn_nodes.append(node)
        placements.append(Placement("learner", i, node, got, "learner", (i,), float(learner_gpus)))
        if got:
            policy = shape(cfg.model.path)
            ref_shape = shape(cfg.model.reference) if cfg.model.reference else policy
            est = memory.learner_memory(policy, LearnerSetup(
                ranks=n_learn, zero_stage=cfg.learner.zero_stage, micro_batch=load.micro_batch,
                seq_len=load.seq_len, logit_tokens=load.logit_tokens, checkpointing=cfg.learner.gradient_checkpointing,
                offload_optimizer=cfg.learner.offload_optimizer, offload_params=cfg.learner.offload_params,
                reference=ref_mode, optimizer_states=memory.OPTIMIZER_STATES[load.optimizer]), ref_shape)
            uses.append(GpuUse(node, got[0], f"learner-{i}", est))
    learner_bundle = {**cpu_bundle(res.learner), **({"GPU": 1.0} if learner_gpus else {})}
    groups.append(BundleGroup("learner", (learner_bundle,) * n_learn, _strategy_for(learn_nodes)))

    # A reference actor of its own, when the config asks for one: the next free GPU after the learner's.
    if ref_mode == "actor":
        node, got = None, ()
        if learner_gpus:
            node = gpus.first_fit(1)
            if node is None:
                raise gpus.shortage("reference", 1)
            node, got = gpus.take("reference", 1, node)
            ref_shape = shape(cfg.model.reference or cfg.model.path)
            uses.append(GpuUse(node, got[0], "reference-0", memory.reference_actor_memory(
                ref_shape, load.micro_batch, load.seq_len, load.logit_tokens)))
        placements.append(Placement("reference", 0, node, got, "reference", (0,), float(len(got))))
        groups.append(BundleGroup("reference", ({**cpu_bundle(res.learner), **({"GPU": 1.0} if got else {})},),
                                  "STRICT_PACK"))

    # Reward models: the next free GPUs.
    reward_gpus = _whole_gpus(cfg, "reward")
    reward_nodes = []
    for i in range(res.reward.num_workers):
        node, got = None, ()
        if reward_gpus:
            node = gpus.first_fit(reward_gpus)
            if node is None:
                raise gpus.shortage(f"reward {i}", reward_gpus)
            node, got = gpus.take(f"reward {i}", reward_gpus, node)
            if cfg.reward.backend in ("model", "pairwise"):
                # reward.dtype auto is bfloat16 on a GPU (actors/reward.py).
                dtype = "bfloat16" if cfg.reward.dtype == "auto" else cfg.reward.dtype
                est = memory.reward_memory(shape(cfg.reward.model), cfg.reward.batch_size, cfg.reward.max_length,
                                           dtype)
                # A model split over several GPUs (device_map) holds a share of it on each.
                est = Estimate({k: v / len(got) for k, v in est.terms.items()})
            else:
                est = Estimate({})
            for g in got:
                uses.append(GpuUse(node, g, f"reward-{i}", est))
        reward_nodes.append(node)
        placements.append(Placement("reward", i, node, got, "reward", (i,), float(reward_gpus)))
    reward_bundle = {**cpu_bundle(res.reward), **({"GPU": float(reward_gpus)} if reward_gpus else {})}
    groups.append(BundleGroup("reward", (reward_bundle,) * res.reward.num_workers, _strategy_for(reward_nodes)))

    # Rollout engines fill the rest: tensor_parallel_size GPUs on one node per engine.
    rollout_gpus = _whole_gpus(cfg, "rollout")
    tp = cfg.rollout.tensor_parallel_size if cfg.rollout.backend == "vllm" else 1
    if tp > 1 and rollout_gpus > 1:
        raise PlanError(f"resources.rollout.num_gpus: {rollout_gpus} with rollout.tensor_parallel_size {tp}; a "
                        "tensor-parallel engine takes one GPU per rank (allowed: 0 or 1)")
    per_engine = tp * rollout_gpus
    strategy = res.placement
    engine_nodes: list[int | None] = []
    for i in range(res.rollout.num_workers):
        node, got = None, ()
        if per_engine:
            if strategy in ("SPREAD", "STRICT_SPREAD"):
                node = gpus.roomiest(per_engine, exclude=set(engine_nodes) if strategy == "STRICT_SPREAD" else set())
            elif strategy == "STRICT_PACK" and engine_nodes:
                node = engine_nodes[0] if len(gpus.free[engine_nodes[0]]) >= per_engine else None
            else:
                node = gpus.first_fit(per_engine)
            if node is None:
                extra = " on a node no other engine uses (STRICT_SPREAD)" if strategy == "STRICT_SPREAD" else ""
                raise PlanError(gpus.shortage(f"rollout engine {i}", per_engine).args[0] + extra)
            node, got = gpus.take(f"rollout engine {i}", per_engine, node)
            policy = shape(cfg.model.path)
            max_len = cfg.rollout.max_model_len or seq_len
            for g in got:
                if cfg.rollout.backend == "vllm":
                    est = memory.vllm_memory(policy, tp, target.gpu_bytes, max_len,
                                             kv_cache_bytes=cfg.rollout.kv_cache_bytes,
                                             gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
                else:
                    batch = math.ceil(cfg.creator.batch_size * cfg.solver.n_responses / res.rollout.num_workers)
                    est = memory.hf_rollout_memory(policy, batch, seq_len)
                use = GpuUse(node, g, f"rollout-{i}", est)
                if cfg.rollout.backend == "vllm":
                    fits = memory.kv_cache_sequences(policy, tp, est.terms["kv_cache"], max_len)
                    if fits < 1:
                        use.notes.append(f"KV cache holds {fits:.2f} of one {max_len}-token sequence")
                uses.append(use)
        engine_nodes.append(node)
        first = len(engine_nodes) - 1
        if tp > 1 or per_engine > 1:
            name = f"rollout-{i}"
            bundles, actor_gpus = engine_bundles(cpu_bundle(res.rollout), tp, rollout_gpus,
                                                 cfg.rollout.tensor_parallel_executor)
            placements.append(Placement("rollout", i, node, got, name, tuple(range(len(bundles))), actor_gpus))
            groups.append(BundleGroup(name, bundles, "STRICT_PACK"))
        else:
            placements.append(Placement("rollout", i, node, got, "rollout", (first,), float(rollout_gpus)))
    if not (tp > 1 or per_engine > 1):
        b = {**cpu_bundle(res.rollout), **({"GPU": float(rollout_gpus)} if rollout_gpus else {})}
        groups.append(BundleGroup("rollout", (b,) * res.rollout.num_workers, strategy))

    # The creator: CPU only, wherever Ray puts it.
    if _whole_gpus(cfg, "creator"):
        raise PlanError(f"resources.creator.num_gpus: {res.creator.num_gpus}; the creator runs on CPU (allowed: 0)")
    placements.append(Placement("creator", 0, None, (), None, ()))

    overflows = _overflows(uses, target)
    return Plan(target, placements, groups, uses, overflows, notes=[load.note] if load.note else [])


def _overflows(uses: list[GpuUse], target: Target) -> list[str]:
    """One message per GPU that does not fit, the worst first."""
    cap = target.gpu_bytes
    by_gpu: dict[tuple[int, int], list[GpuUse]] = {}
    for u in uses:
        by_gpu.setdefault((u.node, u.gpu), []).append(u)
    found: list[tuple[float, str]] = []
    for (node, gpu), us in by_gpu.items():
        total = sum(u.estimate.total for u in us)
        actors = "+".join(u.actor for u in us)
        if total > cap:
            name, biggest = max((u.estimate.largest() for u in us), key=lambda kv: kv[1])
            found.append((total - cap, f"{actors} on node {node} GPU {gpu} needs {total / GB:.1f} GB of "
                                       f"{target.gpu_memory_gb:g} GB: {(total - cap) / GB:.1f} GB over "
                                       f"(largest term: {name} {biggest / GB:.1f} GB)"))
        for u in us:
            for note in u.notes:
                found.append((0.0, f"{u.actor} on node {node} GPU {gpu}: {note}; raise "
                                   "rollout.gpu_memory_utilization or rollout.kv_cache_bytes"))
    return [msg for _, msg in sorted(found, key=lambda t: -t[0])]


# --------------------------------------------------------------------------------------------------- the table


TERM_COLUMNS = ("weights", "gradients", "optimizer", "buckets", "reference", "activations", "logits", "kv_cache",
                "runtime")
_SHORT = {"gradients": "grads", "optimizer": "optim", "reference": "ref", "activations": "activ",
          "kv_cache": "kv", "buckets": "bucket"}


def format_plan(plan: Plan) -> str:
    """The layout and the memory table, as printed by ``eva-ray plan``."""
    t = plan.target
    lines = [f"target: {t.nodes} node(s) x {t.gpus_per_node} GPU(s) x {t.gpu_memory_gb:g} GB (from {t.source})", ""]
    lines.append("placement:")
    for p in plan.placements:
        where = "any node, CPU" if p.node is None and not p.gpus else (
            f"node {p.node}, CPU" if not p.gpus else f"node {p.node}, GPU {','.join(map(str, p.gpus))}")
        group = f"  [group {p.group}, bundle {','.join(map(str, p.bundle_indices))}]" if p.group else ""
        if p.gpus and p.actor_gpus == 0:
            group += " (vLLM's Ray workers hold the GPUs, one bundle each)"
        lines.append(f"  {p.name:<12} {where}{group}")
    lines.append("placement groups:")
    for g in plan.groups:
        shown = ["{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}" for b in g.bundles]
        bundles = f"{len(shown)} x {shown[0]}" if len(set(shown)) == 1 else ", ".join(shown)
        lines.append(f"  {g.name:<12} {g.strategy:<13} {bundles if shown else 'no bundles'}")
    if plan.gpus:
        lines.append("")
        lines.append("memory per GPU (GB; total adds the allocator's 5% and the CUDA context):")
        head = ["node", "gpu", "actor", *(_SHORT.get(c, c) for c in TERM_COLUMNS), "total", "free"]
        rows = []
        for u in plan.gpus:
            terms = u.estimate.terms
            cells = [f"{terms[c] / GB:.1f}" if c in terms else "-" for c in TERM_COLUMNS]
            free = t.gpu_bytes - u.estimate.total
            rows.append([str(u.node), str(u.gpu), u.actor, *cells, f"{u.estimate.total / GB:.1f}",
                         f"{free / GB:.1f}"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  " + "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(fmt(head))
        lines.extend(fmt(r) for r in rows)
    lines.extend(plan.notes)
    lines.append("")
    lines.append("fits" if plan.fits else f"does not fit: {plan.error_line()}")
    return "\n".join(lines)


def check_plan(cfg: Config, target: Target) -> Plan:
    """The plan, or a PlanError whose one line names what overflows."""
    plan = make_plan(cfg, target)
    if not plan.fits:
        raise PlanError(plan.error_line())
    return plan
