"""The `eva-ray` command line.

    eva-ray run                                                      # the default: the cipher world
    eva-ray run --config configs/tiny.yaml solver.algorithm=oaif     # one online eva run (local Ray, or the
                                                                    # cluster of `ray job submit`)
    eva-ray run --config configs/tiny.yaml --inline                 # the same without Ray
    eva-ray run --resume runs/tiny-20260101-120000                  # continue a run from its last checkpoint
    eva-ray run --resume runs/tiny-20260101-120000/checkpoints/step-00000100   # ... or from a chosen one
    eva-ray config --config configs/tiny.yaml creator.capacity=64   # print the resolved, validated config
    eva-ray config --reference > docs/config.md                     # every knob with its default and meaning
    eva-ray plan --config F [--nodes N --gpus-per-node G --gpu-memory-gb M]   # where every actor goes, and
                                                                    # whether each GPU's memory fits
    python -m launch config ...                                     # the same, without the console script

Errors in a config print one line per problem (the dotted path, the bad value, what is allowed) and exit with 2.
A layout that does not fit (``eva-ray plan``, and ``eva-ray run`` of a config that asks for GPUs) prints one line
naming the overflow and exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eva_ray.config import ConfigError, load_config, reference_markdown, to_yaml


def _config_command(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_markdown())
        return 0
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def _plan_command(args: argparse.Namespace) -> int:
    from launch.plan import PlanError, format_plan, make_plan, resolve_target

    cfg = load_config(args.config, args.overrides)
    try:
        plan = make_plan(cfg, resolve_target(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                             gpu_memory_gb=args.gpu_memory_gb))
    except PlanError as exc:
        print(f"eva-ray: plan does not fit: {exc}", file=sys.stderr)
        return 1
    from launch.storage import checkpoint_line

    size = checkpoint_line(cfg)
    if size:
        plan.notes.append(size)
    print(format_plan(plan))
    if not plan.fits:
        print(f"eva-ray: plan does not fit: {plan.error_line()}", file=sys.stderr)
        return 1
    return 0


def _check_plan_before_run(cfg) -> int:
    """A config that asks for GPUs is planned first (as ``eva-ray plan`` would); CPU-only configs skip this."""
    from launch.plan import PlanError, check_plan, resolve_target, uses_gpus

    if not uses_gpus(cfg):
        return 0
    try:
        check_plan(cfg, resolve_target(cfg))
    except PlanError as exc:
        print(f"eva-ray: plan does not fit: {exc} (see `eva-ray plan`)", file=sys.stderr)
        return 1
    return 0


DEFAULT_RUN = Path(__file__).with_name("default_run.yaml")


def _run_command(args: argparse.Namespace) -> int:
    if args.resume:  # the run's own config, unless another is named (it must then agree, see launch/checkpoint.py)
        from launch.checkpoint import split_resume_path

        cfg = load_config(args.config or split_resume_path(args.resume)[0] / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config or DEFAULT_RUN, args.overrides)
    if not args.inline and _check_plan_before_run(cfg):
        return 1
    from actors.creator import CreatorStarved
    from actors.evolve_llm import EvolveLLMError
    from eva_ray.data import DataError
    from launch import signals
    from eva_ray.packaged_models import PackagedModelUnavailable
    from actors.weight_channel import WeightSyncError
    from launch.checkpoint import ResumeError
    from launch.cluster import ClusterError
    from launch.driver import StalePolicyError, run
    from launch.offline import run_offline
    from launch.handles import ActorTimeout
    from launch.recovery import ActorLost, resume_command
    from launch.storage import StorageError, stop_line

    try:
        summary = (run_offline if cfg.run.mode == "offline" else run)(cfg, inline=args.inline, resume=args.resume)
    except (DataError, PackagedModelUnavailable, ResumeError, ConfigError) as exc:
        print(f"eva-ray: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (ClusterError, CreatorStarved, EvolveLLMError, StalePolicyError, ActorLost, ActorTimeout,
            WeightSyncError, StorageError) as exc:
        # Known ways a run can stop: one clear line; the run directory already holds what was written.
        print(f"eva-ray: run stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a write before the run's actors started (its config, metrics.jsonl)
        line = stop_line(exc, cfg.run.output_dir, None, resume_command(args.resume) if args.resume else "")
        if line is None:
            raise
        print(f"eva-ray: run stopped: StorageError: {line}", file=sys.stderr)
        return 1
    if summary.interrupted:
        return signals.EXIT_CODE if signals.terminated() else 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eva-ray", description="eva: evolving prompts for online RL post-training.")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("config", help="print the resolved config (defaults < YAML file < overrides)")
    show.add_argument("--config", help="YAML config file")
    show.add_argument("--reference", action="store_true", help="print the reference of every config field")
    show.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    show.set_defaults(handler=_config_command)
    go = commands.add_parser("run", help="run online eva")
    go.add_argument("--config", help="YAML config file (default: the cipher world, launch/default_run.yaml)")
    go.add_argument("--inline", action="store_true", help="run every actor in this process, without Ray")
    go.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest intact checkpoint, or "
                                                        "from the checkpoint folder RUN_DIR/checkpoints/step-N "
                                                        "(its own config; only run.total_steps, run.call_timeout_s "
                                                        "and logging.* may be overridden)")
    go.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    go.set_defaults(handler=_run_command)
    plan = commands.add_parser("plan", help="place every actor and check each GPU's memory, without starting any")
    plan.add_argument("--config", help="YAML config file")
    plan.add_argument("--nodes", type=int, help="nodes of the target (default: cluster.nodes, or the Ray cluster "
                                                "named by RAY_ADDRESS)")
    plan.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: cluster.gpus_per_node)")
    plan.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GB (default: cluster.gpu_memory_gb)")
    plan.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    plan.set_defaults(handler=_plan_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Per-shard "Loading weights" bars from every actor drown the one progress line per step that matters.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"eva-ray: config error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
