"""Step time of eva-ray against TRL's RLOOTrainer on the same work, and the cost of eva's creator.

The work (eva_ray/peer_work.py): a 2-layer Llama (hidden 128, FFN 256, character tokenizer), 8 prompts x 4 samples
x 32 new tokens per step, RLOO, lr 1e-4, beta 0.05, reward = digits in the response, no creator, no evaluation.
Arms, each a fresh subprocess per round, run one at a time and interleaved over rounds (the order flips every round),
so they never share the CPU and a drift of the machine hits every arm alike:

  trl              TRL's RLOOTrainer in one process (this script's --worker-trl)
  eva-inline       eva-ray run --inline      every actor in the driver's process, no Ray
  eva-ray-sync     eva-ray run run.overlap=off   on a local Ray instance, steps in sequence
  eva-ray-overlap  eva-ray run run.overlap=on    on Ray, the next rollout generated while the learner trains

Per step: eva-ray's own ``timing/step_s`` (metrics.jsonl) and TRL's time between two ``on_step_end`` callbacks; and
for every arm the wall time between two of its per-step lines as this script receives them (the same clock for all).
The first --warmup steps are dropped; medians over the rest, per round and pooled. Each eva-ray arm also reports
the median of every timing/* stage, to show where the time goes. The load average before and after each run is
recorded: on a machine others load, torch's spinning OpenMP threads can make any arm ten times slower.

    python scripts/bench_peer.py                               # 40 steps, 2 rounds, all four arms
    python scripts/bench_peer.py --steps 15 --rounds 1 --arms trl,eva-inline --out /tmp/peer.json
    python scripts/bench_peer.py --env OMP_WAIT_POLICY=PASSIVE # every arm's threads sleep instead of spinning
    python scripts/bench_peer.py --creator-overhead            # default chain_sum run, curriculum vs none, 300 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from eva_ray import peer_work  # noqa: E402

PEER_ARMS = ("trl", "eva-inline", "eva-ray-sync", "eva-ray-overlap")
CREATOR_ARMS = ("curriculum", "none")
# The driver's progress line and the TRL worker's own line both start like this; one per finished step.
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\b")
# Column order of the stage table; any other timing/* key follows, alphabetically.
STAGE_ORDER = ("next_batch_s", "generate_s", "reward_s", "report_s", "prefetch_s", "train_s", "learner_s",
               "learner_ref_s", "sync_s", "stats_s", "step_s")
TAIL_LINES = 40


class ArmFailed(RuntimeError):
    """An arm's run exited non-zero, timed out, or left no per-step times."""


# ------------------------------------------------------------------------------------------------ statistics


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def after_warmup(per_step: dict[int, float], warmup: int) -> list[float]:
    return [s for step, s in sorted(per_step.items()) if step > warmup]


# ------------------------------------------------------------------------------------------------ running arms


EXTRA_ENV: dict[str, str] = {}  # --env: set for every process of every arm (Ray's actors inherit it too)


def child_env() -> dict[str, str]:
    """The environment of every arm: no wandb, no shared wandb service, no outside Ray cluster, unbuffered."""
    env = dict(os.environ)
    env.update(EXTRA_ENV)
    env.pop("WANDB_SERVICE", None)  # a parent's wandb service would be shared (and outlive) the child's runs
    env.pop("RAY_ADDRESS", None)    # each Ray arm starts, and stops, a local instance of its own
    env.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no output)"


def run_logged(name: str, cmd: list[str], log_dir: Path, timeout_s: float) -> dict[int, float]:
    """Run ``cmd``; return the wall time of each step (between two step lines as they arrive), keyed by step.

    stdout comes through a pipe that a thread reads, so each line is timestamped on arrival (the child runs
    unbuffered) while the main thread holds the timeout; stderr goes to a file, which cannot fill up and block.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    wall: dict[int, float] = {}

    def read(stream, out) -> None:
        last = None
        for line in stream:
            now = time.perf_counter()
            out.write(line)
            match = STEP_LINE.match(line)
            if match:
                if last is not None:
                    wall[int(match.group(1))] = now - last
                last = now

    with open(out_path, "w", encoding="utf-8") as out, open(err_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                bufsize=1)
        reader = threading.Thread(target=read, args=(proc.stdout, out), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: eva-ray shuts its actors (and its Ray instance) down on it
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(timeout=5)
            raise ArmFailed(f"{name}: no end after {timeout_s:.0f}s\n  command: {' '.join(cmd)}\n"
                            f"--- stderr tail ({err_path}) ---\n{tail(err_path)}") from None
        reader.join(timeout=30)  # the pipe closes with the child; what is left to read is at most a few lines
    if rc != 0:
        raise ArmFailed(f"{name}: exited with {rc}\n  command: {' '.join(cmd)}\n--- stderr tail ({err_path}) ---\n"
                        f"{tail(err_path)}\n--- stdout tail ({out_path}) ---\n{tail(out_path, 10)}")
    return wall


def read_metrics(run_root: Path) -> tuple[dict[int, float], dict[str, dict[int, float]], str]:
    """(timing/step_s by step, every timing/* key by step, the run directory) from the run's metrics.jsonl."""
    files = sorted(run_root.glob("*/metrics.jsonl"))
    if len(files) != 1:
        raise ArmFailed(f"expected one run directory with metrics.jsonl under {run_root}, found {len(files)}")
    stages: dict[str, dict[int, float]] = {}
    for line in files[0].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        step = row.get("train/global_step")
        if not step or not isinstance(row.get("timing/step_s"), (int, float)):
            continue  # the initial-eval row (step 0) and table rows carry no step timing
        for key, value in row.items():
            if key.startswith("timing/") and isinstance(value, (int, float)):
                stages.setdefault(key.removeprefix("timing/"), {})[step] = float(value)
    if "step_s" not in stages:
        raise ArmFailed(f"{files[0]} holds no timing/step_s")
    return stages["step_s"], stages, str(files[0].parent)


def eva_cmd(*extra: str, inline: bool = False) -> list[str]:
    # `python -m launch run` is the `eva-ray run` command line without depending on the console script's PATH.
    return [sys.executable, "-m", "launch", "run", *(["--inline"] if inline else []), *extra]


def load() -> float | None:
    """The 1-minute load average: on a shared machine, other people's work slows every arm (torch's threads worst)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_eva(name: str, cmd: list[str], work: Path, timeout_s: float) -> dict[str, Any]:
    wall = run_logged(name, cmd, work / "logs", timeout_s)
    step_s, stages, run_dir = read_metrics(work / "runs")
    return {"step_s": step_s, "wall_s": wall, "stages": stages, "run_dir": run_dir}


def run_trl(name: str, work: Path, model_dir: str, prompts: str, steps: int, timeout_s: float) -> dict[str, Any]:
    result = work / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-trl", "--model", model_dir, "--prompts", prompts,
           "--steps", str(steps), "--result", str(result), "--trl-output", str(work / "trl-out")]
    wall = run_logged(name, cmd, work / "logs", timeout_s)
    if not result.is_file():
        raise ArmFailed(f"{name}: the TRL worker wrote no {result}; stderr tail:\n{tail(work / 'logs' / 'stderr.log')}")
    step_s = {int(k): v for k, v in json.loads(result.read_text())["step_s"].items()}
    return {"step_s": step_s, "wall_s": wall, "stages": {}, "run_dir": str(work)}


# --------------------------------------------------------------------------------------------------- TRL worker


def trl_worker(args: argparse.Namespace) -> int:
    """One TRL RLOO run of the peer work; writes the time of each step (between on_step_end callbacks)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    times: dict[int, float] = {}

    class StepClock(TrainerCallback):
        """Timestamps each step's end; the line it prints is what the parent's wall clock reads."""

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            now = time.perf_counter()
            times[state.global_step] = now - self.last
            self.last = now
            print(f"step {state.global_step}/{state.max_steps} trl {times[state.global_step]:.4f}s", flush=True)

    # Chat-form prompts: TRL applies the tokenizer's chat template, as eva-ray's rollout worker does.
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]}
                              for text in peer_work.read_prompts(args.prompts)])
    trainer = RLOOTrainer(model=args.model, reward_funcs=peer_work.trl_digit_reward,
                          args=RLOOConfig(**peer_work.trl_config_kwargs(args.trl_output, steps=args.steps)),
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(args.model),
                          callbacks=[StepClock()])
    trainer.train()
    Path(args.result).write_text(json.dumps({"step_s": times}))
    return 0


# ------------------------------------------------------------------------------------------------------ reports


def summarize(rounds: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    step = [s for r in rounds for s in after_warmup(r["step_s"], warmup)]
    wall = [s for r in rounds for s in after_warmup(r["wall_s"], warmup)]
    stage_keys = {k for r in rounds for k in r["stages"]}
    return {
        "round_medians": [median(after_warmup(r["step_s"], warmup)) for r in rounds],
        "round_wall_medians": [median(after_warmup(r["wall_s"], warmup)) for r in rounds],
        "median_step_s": median(step), "median_wall_s": median(wall), "n_steps": len(step),
        # A stage missing on some steps (sync_s after a step without an update) is the median of the steps it ran.
        "stages": {k: median(s for r in rounds for s in after_warmup(r["stages"].get(k, {}), warmup))
                   for k in stage_keys},
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def step_table(summary: dict[str, dict[str, Any]], refs: list[str], measure: str) -> list[str]:
    key = "median_step_s" if measure == "step" else "median_wall_s"
    n_rounds = max(len(s["round_medians"]) for s in summary.values())
    head = ["arm", *[f"round {i + 1}" for i in range(n_rounds)], "median s/step", "wall s/step",
            *[f"/ {ref}" for ref in refs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, s in summary.items():
        cells = [arm, *[fmt(m) for m in s["round_medians"]], fmt(s["median_step_s"]), fmt(s["median_wall_s"]),
                 *[ratio(s[key], summary[ref][key]) if ref in summary else "-" for ref in refs]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stage_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    keys = {k for s in summary.values() for k in s["stages"]}
    if not keys:
        return []
    cols = [k for k in STAGE_ORDER if k in keys] + sorted(keys - set(STAGE_ORDER))
    lines = ["| arm | " + " | ".join(c.removesuffix("_s") for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for arm, s in summary.items():
        if s["stages"]:
            lines.append(f"| {arm} | " + " | ".join(fmt(s["stages"].get(c), 4) for c in cols) + " |")
    return lines


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "trl", "ray", "deepspeed"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), **versions}


# ---------------------------------------------------------------------------------------------------------- main


def run_rounds(arms: list[str], rounds: int, warmup: int, run_one) -> dict[str, list[dict[str, Any]]]:
    """Every arm once per round, ``run_one(arm, round)`` each; the arm order flips every round, so no arm always
    runs first or last."""
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            print(f"bench_peer: round {r + 1}/{rounds} {arm} ... (load {fmt(load(), 2)})", flush=True)
            before, started = load(), time.perf_counter()
            out = run_one(arm, r)
            out.update(seconds=time.perf_counter() - started, load_before=before, load_after=load())
            print(f"bench_peer:   {arm}: median {fmt(median(after_warmup(out['step_s'], warmup)))} s/step, "
                  f"{out['seconds']:.0f}s in all, load {fmt(before, 2)} -> {fmt(out['load_after'], 2)}", flush=True)
            results[arm].append(out)
    return results


def peer_bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in PEER_ARMS]
    if unknown or not arms:
        raise SystemExit(f"bench_peer: unknown arm(s) {unknown}; allowed: {', '.join(PEER_ARMS)}")
    # One model and one prompt file for every arm and round: the same starting weights and the same D.
    model_dir = peer_work.build_model(root / "model")
    prompts = peer_work.write_prompts(root / "prompts.jsonl")

    def run_one(arm: str, r: int) -> dict[str, Any]:
        work = root / f"{arm}-r{r + 1}"
        if arm == "trl":
            return run_trl(arm, work, model_dir, prompts, args.steps, args.arm_timeout)
        config = peer_work.write_eva_config(work / "eva.yaml", model_dir, prompts, steps=args.steps,
                                            output_dir=str(work / "runs"))
        if arm == "eva-inline":
            return run_eva(arm, eva_cmd("--config", config, inline=True), work, args.arm_timeout)
        overlap = "off" if arm == "eva-ray-sync" else "on"
        return run_eva(arm, eva_cmd("--config", config, f"run.overlap={overlap}"), work, args.arm_timeout)

    return {"arms": run_rounds(arms, args.rounds, args.warmup, run_one), "refs": ["trl", "eva-ray-sync"]}


def creator_bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    def run_one(arm: str, r: int) -> dict[str, Any]:
        work = root / f"{arm}-r{r + 1}"
        # The chain_sum run as it ships (the default run when this was measured), but for its length, the evolve method, and no held-out evaluation (outside
        # the step either way, and minutes on top).
        # Without a creator nothing refills the buffer once D is used up (step 125 of the default run), so the static
        # arm passes over D again, as the experiment's static-D baseline does.
        static = ["creator.seed_epochs=100"] if arm == "none" else []
        cmd = eva_cmd("--config", str(REPO / "configs" / "chain_sum.yaml"), f"run.total_steps={args.creator_steps}",
                      "logging.eval_every=0", "world.eval_per_level=0",
                      f"evolve.method={arm}", *static, f"run.output_dir={work / 'runs'}",
                      "logging.wandb_mode=disabled")
        return run_eva(arm, cmd, work, args.arm_timeout)

    return {"arms": run_rounds(list(CREATOR_ARMS), args.rounds, args.warmup, run_one), "refs": ["none"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every arm once (default 2)")
    p.add_argument("--arms", default=",".join(PEER_ARMS), help=f"comma-separated (default {','.join(PEER_ARMS)})")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the medians (default 5)")
    p.add_argument("--ratio-on", choices=("step", "wall"), default="step",
                   help="which median the ratios divide: each system's own step time, or the wall time between "
                        "step lines (default step)")
    p.add_argument("--out", help="write every per-step time, the medians and the machine to this JSON file")
    p.add_argument("--keep", help="keep the models, run directories and logs in this folder (default: a temporary "
                                  "folder, removed at the end)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the environment of every arm (repeatable). On a machine others load, OpenMP's "
                        "spinning threads can slow torch tenfold: OMP_WAIT_POLICY=PASSIVE, or OMP_NUM_THREADS=1")
    p.add_argument("--arm-timeout", type=float, default=1800.0, help="seconds one arm's run may take (default 1800)")
    p.add_argument("--creator-overhead", action="store_true",
                   help="instead: the default chain_sum run with evolve.method=curriculum against none")
    p.add_argument("--creator-steps", type=int, default=300, help="steps of each --creator-overhead run (default 300)")
    # The TRL arm's subprocess (internal).
    p.add_argument("--worker-trl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--trl-output", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_trl:
        return trl_worker(args)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench_peer: --env {item!r} is not KEY=VALUE")
        EXTRA_ENV[key] = value
    steps = args.creator_steps if args.creator_overhead else args.steps
    if steps <= args.warmup + 1:
        raise SystemExit(f"bench_peer: {steps} steps leave nothing after --warmup {args.warmup}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-peer-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = creator_bench(args, root) if args.creator_overhead else peer_bench(args, root)
    except ArmFailed as exc:
        print(f"bench_peer: arm failed: {exc}", file=sys.stderr)
        if not args.keep:
            print(f"bench_peer: logs kept in {root}", file=sys.stderr)
        return 1
    summary = {arm: summarize(rounds, args.warmup) for arm, rounds in report["arms"].items() if rounds}
    refs = [ref for ref in report["refs"] if ref in summary]
    what = (f"default chain_sum run, {args.creator_steps} steps" if args.creator_overhead else
            f"peer work: {peer_work.PROMPTS_PER_STEP} prompts x {peer_work.SAMPLES_PER_PROMPT} samples x "
            f"{peer_work.MAX_NEW_TOKENS} tokens, {args.steps} steps")
    loads = [r[k] for rounds in report["arms"].values() for r in rounds for k in ("load_before", "load_after")
             if r.get(k) is not None]
    print(f"\n{what}; {args.rounds} round(s); medians over steps {args.warmup + 1}+; ratios of the "
          f"{args.ratio_on} median; {os.cpu_count()} CPUs, load average {fmt(min(loads, default=None), 2)}-"
          f"{fmt(max(loads, default=None), 2)}; env {' '.join(args.env) or 'as is'}\n")
    # The bench's own arm keeps about one load per core busy (and the 1-minute average lags a run); above that,
    # something else is running.
    if loads and max(loads) > 1.5 * (os.cpu_count() or 1):
        hint = "" if "OMP_WAIT_POLICY" in EXTRA_ENV else "; try --env OMP_WAIT_POLICY=PASSIVE"
        print(f"(the machine was busy with other work: these are not a quiet machine's times{hint})\n")
    print("\n".join(step_table(summary, refs, args.ratio_on)))
    stages = stage_table(summary)
    if stages:
        print("\nper-stage medians (s; eva-ray's timing/* keys)\n")
        print("\n".join(stages))
        if any("prefetch_s" in s["stages"] for s in summary.values()):
            print("\nWith overlap, a step's next_batch, generate and reward ran during the previous step's prefetch "
                  "(overlapping the learner's train); step is the step's own wall time.")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "mode": "creator-overhead" if args.creator_overhead else "peer", "args": vars(args),
            "machine": machine(), "summary": summary, "runs": report["arms"]}, indent=1, default=str))
        print(f"\nbench_peer: wrote {args.out}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
