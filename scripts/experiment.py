"""eva against its ablations in a world (chain_sum, cipher), at equal learner steps and equal rollouts.

Every arm runs one base config (--config; default launch/default_run.yaml) with the same total_steps, minibatch and
n_responses, so arms differ only in how the creator picks and evolves prompts:

  eva      the default: a_avg informativeness, weighted buffer sampling, curriculum evolving
  static   no creator: evolve.method=none, D re-used (creator.seed_epochs=100 so it is never exhausted)
  uniform  creator.metric=uniform: evolving, but no preference for informative prompts
  greedy   creator.sampling=greedy: top-k buffer sampling instead of weighted sampling
  inverse  creator.metric=inv_a_min: prefers the *least* informative prompts
  probe    eva with children measured before they are drawn (creator.child_scoring=probe): each new child gets
           creator.probe_responses rollouts and enters the buffer at its measured score, or is dropped; those
           rollouts count in the run's rollout total (creator/rollouts_total), reported per run
  uniform_all  no creator, fresh prompts at every level in the world's own mix (an oracle that knows the
           difficulty scale; D is made large enough never to repeat)
  a_min, variance, learnability  eva with creator.metric a_min, reward_var, or p(1-p) (SFL's learnability)
  eva_reuse  eva with D re-used (creator.seed_epochs=100): it never enters bootstrap
  eva_refill  eva whose bootstrap refills the buffer (creator.bootstrap_refill=true)
  eva_steer  eva_refill whose curriculum steers never-solved parents easier and always-solved ones harder
           (evolve.steer_by_success=true): the default run's creator
  replay   no evolving: each step's top parents re-enter the buffer as themselves (evolve.method=replay)
  staleness  eva with a PLR-style staleness term in buffer sampling (creator.staleness_coef=0.3), a remedy for a
           buffer that stops replaying what it no longer scores

--sweep KEY=V1,V2 runs every arm at each value (cells named ``arm KEY=V``), e.g. the KL coefficient; --jobs N runs N
inline runs side by side (separate processes). The cipher grid:

    python scripts/experiment.py --config configs/cipher.yaml --name experiment-cipher --seeds 5 --jobs 2 \
        --arms eva,static,uniform_all --sweep solver.beta=0,0.03,0.1 --rollouts 76800 --steps 400
    python scripts/experiment.py --config configs/cipher.yaml --name experiment-cipher-ablations --seeds 5 \
        --jobs 2 --arms eva,a_min,variance,inverse,learnability,greedy,probe,staleness --rollouts 76800 --steps 400

Each arm runs with several run.seed values; the held-out set is fixed by world.eval_seed, so all arms are scored on
the same items. The report (--out: experiment.md + experiment.png) gives, per arm, final held-out greedy accuracy
overall and by level (mean and spread over seeds) and its change from the start. experiment.json holds the same runs
one by one, for scripts: the command, and per run its arm, seed, overrides, start and final held-out accuracy
(overall and by level), the share of trained prompts with a reward spread, steps and rollouts.

Run::

    python scripts/experiment.py --steps 2000 --seeds 3 world.eval_per_level=400
    python scripts/experiment.py --arms eva,probe,static --rollouts 64000 --steps 4000   # equal rollouts
    python scripts/experiment.py --arms eva,static --seeds 1 --steps 60 --out /tmp/exp --runs-dir /tmp/exp/runs
    python scripts/experiment.py --report-only        # redraw the report from the runs already in --runs-dir

Resumable: --runs-dir/index.json records every finished run under (arm, seed, steps, pass-through overrides); a run
whose run directory still holds a complete summary.json is not run again. A run that stopped early (an arm whose
creator starves, say) is recorded with its reason and the step it reached, reported in its own table, and not run
again unless --retry-failed. The exit status is 1 when any run stopped early.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

ARMS: dict[str, list[str]] = {
    "eva": [],
    # seed_epochs=100: with no creator, exhausting D would end the run (nothing evolves to bootstrap from).
    "static": ["evolve.method=none", "creator.seed_epochs=100"],
    "uniform": ["creator.metric=uniform"],
    "greedy": ["creator.sampling=greedy"],
    "inverse": ["creator.metric=inv_a_min"],
    "probe": ["creator.child_scoring=probe"],
    "uniform_all": ["evolve.method=none", "creator.seed_epochs=100", "world.level_mix=null", "world.seed_size=16000"],
    "a_min": ["creator.metric=a_min"],
    "variance": ["creator.metric=reward_var"],
    "learnability": ["creator.metric=learnability"],
    "staleness": ["creator.staleness_coef=0.3"],
    # D re-used as static does (it is never exhausted), so the creator stays in mix-up: half of every batch from the
    # buffer, half from D, as the pilot's creator mixed them. Under the paper's bootstrap (D used once) a small D is
    # gone in a few steps and the buffer, popped faster than rejected children refill it, empties.
    "eva_reuse": ["creator.seed_epochs=100"],
    # The paper's bootstrap with a refill: children per parent rise (up to n_new) while the buffer runs low.
    "eva_refill": ["creator.bootstrap_refill=true"],
    # The creator the default run uses: refill, and parents never solved get easier children (always solved:
    # harder), so a batch without any reward spread walks towards prompts the solver can solve.
    "eva_steer": ["creator.bootstrap_refill=true", "evolve.steer_by_success=true"],
    # The paper's "evolving vs not": the buffer replays the informative parents themselves, nothing new is made.
    "replay": ["evolve.method=replay"],
}
DEFAULT_ARMS = ("eva", "static", "uniform", "greedy", "inverse")  # probe is asked for by name (--arms)
INDEX = "index.json"
READING_HEADING = "\n## Reading"


# ---------------------------------------------------------------------------------------------------------- running


def run_key(arm: str, seed: int, steps: int, overrides: list[str]) -> str:
    # The pass-through overrides are part of the key: a run with another lr or eval size is another experiment.
    extra = " ".join(sorted(overrides))
    return f"{arm}|seed={seed}|steps={steps}" + (f"|{extra}" if extra else "")


def complete_summary(run_dir: str | Path, steps: int) -> dict | None:
    """The run's summary.json if the run finished with an evaluation, else None: all its steps, or fewer when its
    rollout budget (run.total_rollouts) was spent first."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ended = summary.get("steps_done") == steps or (0 < rollout_budget(run_dir) <= summary.get("rollouts", 0))
    ok = (ended and not summary.get("error") and not summary.get("interrupted")
          and "accuracy" in summary.get("eval", {}) and "accuracy" in summary.get("eval_start", {}))
    return summary if ok else None


def rollout_budget(run_dir: str | Path) -> int:
    """The run's run.total_rollouts (0: none) from its config.yaml."""
    import yaml

    try:
        return int(yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["run"].get("total_rollouts") or 0)
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return 0


def load_index(runs_dir: Path) -> dict[str, dict]:
    path = runs_dir / INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def save_run(runs_dir: Path, key: str, rec: dict) -> None:
    """Add one run to the index on disk, atomically, right after it ends.

    The index is re-read first, so two experiments sharing a runs directory (say, two learning rates run one after
    the other, or a hand-made correction while one runs) never overwrite each other's records; an interrupted
    experiment loses at most the run in progress.
    """
    index = load_index(runs_dir)
    index[key] = rec
    tmp = runs_dir / f"{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(tmp, runs_dir / INDEX)


def stopped_early(runs_dir: Path, arm: str, seed: int, steps: int, error: str) -> dict:
    """The index record of a run that ended before its last step (e.g. its creator starved), with what it reached.

    Recorded so that the report can say which arms could not go the distance, and so that a deterministic failure is
    not re-run every time the experiment resumes (--retry-failed does that on purpose).
    """
    dirs = sorted((runs_dir / cell_dir(arm)).glob(f"{cell_dir(arm)}-seed{seed}-steps{steps}-*"),
                  key=lambda p: p.stat().st_mtime)
    summary: dict[str, Any] = {}
    if dirs:
        try:
            summary = json.loads((dirs[-1] / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
    return {"arm": arm, "seed": seed, "steps": steps, "run_dir": str(dirs[-1]) if dirs else None,
            "error": summary.get("error") or error, "steps_done": summary.get("steps_done"),
            "accuracy_at_stop": summary.get("eval", {}).get("accuracy"),
            "finished": dt.datetime.now().isoformat(timespec="seconds")}


def cell_overrides(cell: str) -> list[str]:
    """The overrides of a cell: its arm's, then its sweep value (``eva solver.beta=0.1``)."""
    arm, _, swept = cell.partition(" ")
    return [*ARMS[arm], *([swept] if swept else [])]


def cell_dir(cell: str) -> str:
    return cell.replace(" ", "_").replace("=", "")


def run_one(config: Path, arm: str, seed: int, steps: int, overrides: list[str], runs_dir: Path, *,
            inline: bool, quiet: bool) -> dict:
    from eva_ray.config import load_config
    from launch.driver import run

    # Arm overrides come after the user's so an arm always means what its name says.
    name = f"{cell_dir(arm)}-seed{seed}-steps{steps}"
    cfg = load_config(config, [*overrides, *cell_overrides(arm), f"run.seed={seed}", f"run.total_steps={steps}",
                               f"run.name={name}", f"run.output_dir={runs_dir / cell_dir(arm)}",
                               "logging.progress=false"])
    tag = f"[{arm} seed {seed}]"
    t0 = time.perf_counter()
    summary = run(cfg, inline=inline, echo=(lambda *a, **k: None) if quiet else (lambda msg: print(tag, msg,
                                                                                                     flush=True)))
    return {"arm": arm, "seed": seed, "steps": steps, "overrides": overrides, "run_dir": summary.run_dir,
            "wall_s": round(time.perf_counter() - t0, 1), "finished": dt.datetime.now().isoformat(timespec="seconds")}


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Run every missing (cell, seed), ``--jobs`` at a time; returns the index records of finished runs and of runs
    that stopped early."""
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    index = load_index(runs_dir)
    records, failed, todo = [], [], []
    for seed in args.seed_list:  # seed-major: a partial experiment still has every arm at the first seeds
        for arm in args.arm_list:
            key = run_key(arm, seed, args.steps, args.overrides)
            rec = index.get(key)
            if rec and rec.get("error") and not args.retry_failed:
                print(f"experiment: skip {key} (stopped early before: {rec['error'][:100]})", flush=True)
                failed.append(rec)
            elif rec and not rec.get("error") and complete_summary(rec["run_dir"], args.steps):
                print(f"experiment: skip {key} (done: {rec['run_dir']})", flush=True)
                records.append(rec)
            elif not args.report_only:
                todo.append((key, arm, seed))
    if not todo:
        return records, failed
    import concurrent.futures
    import multiprocessing

    def finish(key: str, arm: str, seed: int, future: concurrent.futures.Future) -> None:
        try:
            rec = future.result()
        except Exception as exc:  # one broken run should not lose the others; it is recorded and reported
            print(f"experiment: {key} failed: {type(exc).__name__}: {exc}", flush=True)
            rec = stopped_early(runs_dir, arm, seed, args.steps, f"{type(exc).__name__}: {exc}")
        else:
            if not complete_summary(rec["run_dir"], args.steps):
                print(f"experiment: {key} did not finish (see {rec['run_dir']}/summary.json)", flush=True)
                rec = stopped_early(runs_dir, arm, seed, args.steps, "did not finish")
        save_run(runs_dir, key, rec)  # at once: an interrupted experiment loses only the runs in progress
        if rec.get("error"):
            failed.append(rec)
        else:
            print(f"experiment: {key} done in {rec['wall_s']:.0f} s", flush=True)
            records.append(rec)

    kwargs = dict(inline=args.inline, quiet=args.quiet or args.jobs > 1)
    if args.jobs <= 1:
        for key, arm, seed in todo:
            print(f"experiment: run {key}", flush=True)
            finish(key, arm, seed, _done(run_one, args.config, arm, seed, args.steps, args.overrides, runs_dir,
                                         **kwargs))
        return records, failed
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for key, arm, seed in todo:
            print(f"experiment: queue {key}", flush=True)
            futures[pool.submit(run_one, args.config, arm, seed, args.steps, args.overrides, runs_dir,
                                **kwargs)] = (key, arm, seed)
        for future in concurrent.futures.as_completed(futures):
            finish(*futures[future], future)
    return records, failed


def _done(fn, *args, **kwargs):
    """Run now; a finished future (or one holding the exception), so serial and pooled runs read alike."""
    import concurrent.futures

    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - reported by the caller, like a pooled run's
        future.set_exception(exc)
    return future


def metric_rows(run_dir: str | Path) -> list[dict]:
    """The scalar rows of a run's metrics.jsonl (the evolved-prompt tables, large and not needed here, skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip() and "creator/evolved_prompts" not in line]


def curve(rows: list[dict], start: float, key: str = "accuracy") -> list[tuple[int, float]]:
    """Held-out ``eval/<key>`` over steps, with the start value at step 0."""
    points = {0: start}  # the log may hold its own step-0 evaluation; by step, so it is counted once
    for row in rows:
        if row.get(f"eval/{key}") is not None:
            points[int(row["train/global_step"])] = float(row[f"eval/{key}"])
    return sorted(points.items())


def rollout_curve(rows: list[dict], start: dict[str, float]) -> list[list[float]]:
    """``[rollouts so far, accuracy, expected accuracy or NaN]`` at every evaluation, from 0 rollouts: what arms
    that spend rollouts differently (probes) are compared on."""
    points = [[0, start.get("accuracy", math.nan), start.get("expected_accuracy", math.nan)]]
    for row in rows:
        if row.get("eval/accuracy") is not None and row.get("creator/rollouts_total") is not None:
            points.append([int(row["creator/rollouts_total"]), float(row["eval/accuracy"]),
                           float(row.get("eval/expected_accuracy", math.nan))])
    return points


def informative_share(rows: list[dict]) -> float | None:
    """Mean share of trained prompts whose responses had a reward spread: how much of each batch could teach.

    This is what the creator is for; a prompt without spread (all solved or all failed) gives RLOO no signal.
    """
    values = [float(row["train/spread_fraction"]) for row in rows if row.get("train/spread_fraction") is not None]
    return statistics.fmean(values) if values else None


def run_rollouts(run_dir: str | Path, rows: list[dict], steps: int) -> int | None:
    """Rollouts the run generated: trained and (child_scoring=probe) probe rollouts, as the creator counted them.

    Runs from before the creator counted them trained ``batch_size x n_responses`` a step (short bootstrap batches
    aside), which is what is returned for them.
    """
    totals = [row["creator/rollouts_total"] for row in rows if row.get("creator/rollouts_total") is not None]
    if totals:
        return int(totals[-1])
    try:
        import yaml

        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        return int(steps * cfg["creator"]["batch_size"] * cfg["solver"]["n_responses"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def accuracy_keys(acc: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in acc.items() if k.removeprefix("expected_") == "accuracy"
            or k.removeprefix("expected_").startswith("accuracy_level_")}


def levels_of(by_arm: dict[str, list[dict]]) -> list[int]:
    """The difficulty levels the evaluations report (``accuracy_level_<d>``), in order."""
    keys = {k for seeds in by_arm.values() for s in seeds for k in s["start"]}
    return sorted(int(k.rsplit("_", 1)[1]) for k in keys if k.startswith("accuracy_level_"))


def world_name(config: Path) -> str:
    import yaml

    try:
        return (yaml.safe_load(config.read_text()) or {}).get("world", {}).get("name") or "seed-file"
    except (OSError, ValueError, AttributeError):
        return "?"


def collect(records: list[dict]) -> dict[str, list[dict]]:
    """Per arm: one entry per seed with start/final accuracy by key and its learning curve."""
    by_arm: dict[str, list[dict]] = {}
    for rec in records:
        summary = complete_summary(rec["run_dir"], rec["steps"])
        if summary is None:
            continue
        start, final = summary["eval_start"], summary["eval"]
        rows = metric_rows(rec["run_dir"])  # read once for both the curve and the spread share
        by_arm.setdefault(rec["arm"], []).append({
            "seed": rec["seed"], "wall_s": rec.get("wall_s"), "start": start, "final": final,
            "curve": curve(rows, start["accuracy"]), "rollout_curve": rollout_curve(rows, start),
            "informative": informative_share(rows), "health": summary.get("health", {}),
            "overrides": [*rec.get("overrides", []), *cell_overrides(rec["arm"])], "steps": summary["steps_done"],
            "rollouts": run_rollouts(rec["run_dir"], rows, summary["steps_done"]), "run_dir": rec["run_dir"]})
    return by_arm


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float]) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def signed(x: float) -> str:
    return f"{x:+.3f}"


def arm_stats(seeds: list[dict], key: str) -> tuple[dict, dict]:
    """(final accuracy, final - start) statistics over seeds for one accuracy key."""
    final = [s["final"][key] for s in seeds if key in s["final"]]
    delta = [s["final"][key] - s["start"][key] for s in seeds if key in s["final"] and key in s["start"]]
    return stats(final), stats(delta)


def verdict(by_arm: dict[str, list[dict]]) -> str:
    """One plain sentence on what the overall numbers show; differences inside the seed spread are called noise.

    The arm compared with the others is ``eva``, else the first finished arm whose name starts with ``eva`` (a
    variant such as ``eva_steer`` when the paper's ``eva`` did not finish)."""
    ref = "eva" if "eva" in by_arm else next((a for a in by_arm if a.startswith("eva")), None)
    if ref is None or len(by_arm) < 2:
        return "Only one arm finished, so there is no comparison to draw."
    eva_f, eva_d = arm_stats(by_arm[ref], "accuracy")
    others = {a: arm_stats(s, "accuracy") for a, s in by_arm.items() if a != ref and not a.startswith("eva")}
    if not others:
        return "Only eva variants finished, so there is no comparison with a baseline to draw."
    best = max(others, key=lambda a: others[a][0]["mean"])
    best_f = others[best][0]
    diff = eva_f["mean"] - best_f["mean"]
    n = min(eva_f["n"], best_f["n"])
    # With one seed there is no spread to compare against; with more, a gap smaller than either arm's seed std is
    # not evidence of anything.
    noise = max(eva_f["std"], best_f["std"])
    parts = [f"{ref} ends at {eva_f['mean']:.3f} held-out accuracy ({signed(eva_d['mean'])} from the start); "
             f"the best other arm, {best}, ends at {best_f['mean']:.3f} ({signed(others[best][1]['mean'])})."]
    if n < 2:
        parts.append(f"With {n} seed per arm there is no seed spread, so this gap ({signed(diff)}) says nothing yet.")
    elif abs(diff) <= noise:
        parts.append(f"The gap ({signed(diff)}) is within the seed spread (std up to {noise:.3f}): no arm is "
                     f"distinguishable from {ref} on these numbers.")
    elif diff > 0:
        parts.append(f"{ref} is ahead of every other arm, by {signed(diff)} over {best}, more than the seed std "
                     f"({noise:.3f}).")
    else:
        parts.append(f"{ref} does not win: {best} is ahead by {-diff:.3f}, more than the seed std ({noise:.3f}).")
    return " ".join(parts)


def sweep_groups(by_arm: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Cells grouped by their sweep value (``"" `` without a sweep), keyed by arm inside, for one verdict each."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for cell, seeds in by_arm.items():
        arm, _, swept = cell.partition(" ")
        groups.setdefault(swept, {})[arm] = seeds
    return groups


def span(values: list[int | None]) -> str:
    """One number when every seed has it, else min-max: the cost columns, which must read alike across arms."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return "–"
    return f"{known[0]:,}" if known[0] == known[-1] else f"{known[0]:,}–{known[-1]:,}"


def write_markdown(path: Path, by_arm: dict[str, list[dict]], args: argparse.Namespace, command: str,
                   failed: list[dict]) -> None:
    arms = [a for a in args.arm_list if a in by_arm]
    levels = levels_of(by_arm)
    lines = [f"# eva vs ablations in the {world_name(args.config)} world", "",
             f"- date: {dt.date.today().isoformat()}",
             f"- command: `{command}`",
             f"- arms: {', '.join(arms)}; seeds (run.seed): {', '.join(map(str, args.seed_list))}; "
             f"learner steps per run: {args.steps} (same minibatch and n_responses in every arm)"
             + (f", or fewer: each run ends once it has generated {args.rollouts:,} rollouts, probes included"
                if args.rollouts else ""),
             f"- base config: {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}"
             + (f"; overrides: `{' '.join(args.overrides)}`" if args.overrides else ""),
             "- held-out set fixed by world.eval_seed, shared by all arms; greedy decoding",
             "- cells: mean ± std [min–max] over seeds; Δ = final − start, averaged over seeds", ""]
    for arm in arms:
        lines.append(f"  - {arm}: `{' '.join(cell_overrides(arm)) or '(default config)'}`")
    lines += ["", "## Overall held-out accuracy", "",
              "| arm | seeds | start | final | Δ | trained prompts with reward spread | learner steps | rollouts "
              "(probes included) | wall s / run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        seeds = by_arm[arm]
        final, delta = arm_stats(seeds, "accuracy")
        start = stats([s["start"]["accuracy"] for s in seeds])
        walls = [s["wall_s"] for s in seeds if s["wall_s"] is not None]
        wall = f"{statistics.fmean(walls):.0f}" if walls else "–"
        shares = [s["informative"] for s in seeds if s["informative"] is not None]
        share = fmt(stats(shares)) if shares else "–"
        cost = [span([s[k] for s in seeds]) for k in ("steps", "rollouts")]
        lines.append(f"| {arm} | {len(seeds)} | {start['mean']:.3f} | {fmt(final)} | {fmt_delta(delta)} | {share} "
                     f"| {cost[0]} | {cost[1]} | {wall} |")
    lines += ["", "## Final accuracy by level (Δ from start in parentheses)", "",
              "| arm | " + " | ".join(f"L{d}" for d in levels) + " |", "|---|" + "---|" * len(levels)]
    for arm in arms:
        cells = []
        for d in levels:
            final, delta = arm_stats(by_arm[arm], f"accuracy_level_{d}")
            cells.append(f"{fmt(final)} ({signed(delta['mean'])})" if final["n"] else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    start_levels = by_arm[arms[0]][0]["start"] if arms else {}
    if start_levels:
        lines += ["", "Start accuracy by level (same policy and held-out set in every arm): "
                  + ", ".join(f"L{d} {start_levels.get(f'accuracy_level_{d}', float('nan')):.3f}" for d in levels)
                  + "."]
    expected_levels = [d for d in levels if any(f"expected_accuracy_level_{d}" in x["final"]
                                                for seeds in by_arm.values() for x in seeds)]
    if expected_levels:
        lines += ["", "## Expected sampled accuracy by level (teacher-forced mean of pi(answer | prompt))", "",
                  "| arm | all | " + " | ".join(f"L{d}" for d in expected_levels) + " |",
                  "|---|---|" + "---|" * len(expected_levels)]
        for arm in arms:
            cells = [arm_stats(by_arm[arm], k)[0] for k in
                     ["expected_accuracy", *(f"expected_accuracy_level_{d}" for d in expected_levels)]]
            lines.append(f"| {arm} | " + " | ".join(fmt(c) if c["n"] else "–" for c in cells) + " |")
    if any(x.get("health") for seeds in by_arm.values() for x in seeds):
        lines += ["", "## Creator health over the last window of each run (mean over seeds)", "",
                  "| arm | reward spread | skill coverage | corr(info, p(1-p)) | corr(info, p) | seeds starving |",
                  "|---|---|---|---|---|---|"]
        for arm in arms:
            hs = [x["health"] for x in by_arm[arm] if x.get("health")]

            def mean(key: str) -> str:
                vals = [h[key] for h in hs if h.get(key) is not None and math.isfinite(h[key])]
                return f"{statistics.fmean(vals):.2f}" if vals else "–"

            starving = sum(bool(h.get("starving")) for h in hs)
            lines.append(f"| {arm} | {mean('spread_fraction_window')} | {mean('coverage')} | "
                         f"{mean('info_learnability_corr')} | {mean('info_success_corr')} | {starving}/{len(hs)} |")
    lines += ["", "## What the numbers show", ""]
    for suffix, group in sweep_groups(by_arm).items():
        lines.append((f"At {suffix}: " if suffix else "") + verdict(group))
        lines.append("")
    if failed:
        lines += ["", "## Runs that stopped early (not in the tables above)", "",
                  "| arm | seed | steps done | accuracy at the stop | why |", "|---|---|---|---|---|"]
        for rec in failed:
            acc = rec.get("accuracy_at_stop")
            why = " ".join(str(rec.get("error", "")).split())
            why = why if len(why) <= 160 else why[:157] + "..."
            lines.append(f"| {rec['arm']} | {rec['seed']} | {rec.get('steps_done') or '–'} | "
                         f"{'–' if acc is None else f'{acc:.3f}'} | {why.replace('|', '/')} |")
    lines += ["", f"![held-out accuracy per arm]({args.name}.png)", ""]
    reading = kept_reading(path)
    path.write_text("\n".join(lines) + reading)


def write_json(path: Path, by_arm: dict[str, list[dict]], args: argparse.Namespace, command: str,
                failed: list[dict]) -> None:
    """The runs one by one (docs/experiment.json): what a script comparing arms or levers reads."""
    runs = []
    for arm in [a for a in args.arm_list if a in by_arm]:
        for s in sorted(by_arm[arm], key=lambda s: s["seed"]):
            runs.append({"arm": arm, "seed": s["seed"], "overrides": s["overrides"],
                         "start": accuracy_keys(s["start"]), "final": accuracy_keys(s["final"]),
                         "spread_share": s["informative"], "steps": s["steps"], "rollouts": s["rollouts"],
                         "wall_s": s["wall_s"], "health": s["health"],
                         "curve_rollouts_accuracy_expected": s["rollout_curve"]})
    report = {"command": command, "date": dt.date.today().isoformat(),
              "base_config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
              "runs": runs,
              "stopped_early": [{k: rec.get(k) for k in ("arm", "seed", "steps", "steps_done", "accuracy_at_stop",
                                                         "error")} for rec in failed]}
    path.write_text(json.dumps(report, indent=1) + "\n")


def kept_reading(path: Path) -> str:
    """The hand-written ``## Reading`` section at the end of an existing report, so that regenerating keeps it."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    at = text.find(READING_HEADING)
    return text[at:].rstrip() + "\n" if at >= 0 else ""


def fmt_delta(s: dict[str, float]) -> str:
    return signed(s["mean"]) if s["n"] == 1 else f"{signed(s['mean'])} ± {s['std']:.3f}"


def write_plot(path: Path, by_arm: dict[str, list[dict]], arm_order: list[str], stopped: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = [a for a in arm_order if a in by_arm]
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    # Left: final accuracy per arm, overall and at the "sometimes" levels 2-3 where RL can move anything; every seed
    # is a dot, the bar is the mean, so the spread is visible rather than summarised away.
    keys = [("accuracy", "overall"), ("accuracy_level_2", "level 2"), ("accuracy_level_3", "level 3")]
    if any("expected_accuracy" in s["final"] for seeds in by_arm.values() for s in seeds):
        keys.append(("expected_accuracy", "expected (sampled)"))
    width = 0.8 / len(keys)
    x = np.arange(len(arms))
    for j, (key, label) in enumerate(keys):
        means = [np.mean([s["final"].get(key, np.nan) for s in by_arm[a]]) for a in arms]
        pos = x + (j - (len(keys) - 1) / 2) * width
        ax_bar.bar(pos, means, width, label=label, alpha=0.7)
        for p, a in zip(pos, arms):
            vals = [s["final"].get(key, np.nan) for s in by_arm[a]]
            ax_bar.scatter([p] * len(vals), vals, color="black", s=10, zorder=3)
        start = by_arm[arms[0]][0]["start"].get(key) if arms else None
        if start is not None:
            ax_bar.axhline(start, color=f"C{j}", linestyle=":", linewidth=1)
    ax_bar.set_xticks(x, arms)
    ax_bar.set_ylabel("final held-out accuracy (dotted: start)")
    ax_bar.set_ylim(0, 1)
    ax_bar.legend(fontsize=8)
    ax_bar.set_title("final accuracy per arm (dots: seeds)")
    # Right: overall held-out accuracy against rollouts spent (probes included), mean over seeds with the min-max
    # band, so that arms that spend rollouts differently compare at equal cost.
    for arm in arms:
        curves = [s["rollout_curve"] for s in by_arm[arm]]
        n = min(len(c) for c in curves)
        xs = np.array([[p[0] for p in c[:n]] for c in curves]).mean(0)
        vals = np.array([[p[1] for p in c[:n]] for c in curves])
        ax_curve.plot(xs, vals.mean(0), marker="o", markersize=3, color=f"C{arm_order.index(arm) % 10}", label=arm)
        if len(curves) > 1:
            ax_curve.fill_between(xs, vals.min(0), vals.max(0), color=f"C{arm_order.index(arm) % 10}", alpha=0.15)
    # Arms whose runs stopped early: their curves up to the last evaluation every seed reached, dashed, so that what
    # they learned before starving is visible next to the arms that went the distance.
    for arm in [a for a in arm_order if a not in by_arm]:
        for i, rec in enumerate(r for r in stopped if r["arm"] == arm and r.get("run_dir")):
            points = rollout_curve(metric_rows(rec["run_dir"]), {})[1:]
            if points:
                ax_curve.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", marker="x",
                              markersize=3, color=f"C{arm_order.index(arm) % 10}",
                              label=f"{arm} (stopped early)" if i == 0 else None)
    ax_curve.set_xlabel("rollouts (probes included)")
    ax_curve.set_ylabel("held-out accuracy (overall)")
    ax_curve.set_title("learning curves (mean over seeds, band: min–max)")
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_headline_plot(path: Path, by_arm: dict[str, list[dict]], cells: list[str], title: str) -> None:
    """Held-out accuracy against rollouts for a few cells (the README's picture): mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, cell in enumerate(c for c in cells if c in by_arm):
        curves = [s["rollout_curve"] for s in by_arm[cell]]
        n = min(len(c) for c in curves)
        xs = np.array([[p[0] for p in c[:n]] for c in curves]).mean(0)
        vals = np.array([[p[1] for p in c[:n]] for c in curves])
        ax.plot(xs, vals.mean(0), marker="o", markersize=3, color=f"C{i}",
                label=f"{cell.split(' ')[0]} ({len(curves)} seeds)")
        ax.fill_between(xs, vals.min(0), vals.max(0), color=f"C{i}", alpha=0.15)
    ax.set_xlabel("rollouts")
    ax.set_ylabel("held-out accuracy (greedy, all levels)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------- cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="number of run.seed values per arm")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--steps", type=int, default=2000, help="learner steps per run (run.total_steps)")
    p.add_argument("--rollouts", type=int, default=0,
                   help="equal cost: every run also ends at the step where its rollouts (trained and probe) reach "
                        "this many (run.total_rollouts); --steps is then the most a run may take")
    p.add_argument("--out", default=str(REPO / "docs"), help="where experiment.md, .json and .png go")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "experiment"), help="run directories and index.json")
    p.add_argument("--config", type=Path, default=REPO / "launch" / "default_run.yaml", help="base config YAML")
    p.add_argument("--inline", action=argparse.BooleanOptionalAction, default=True,
                   help="run actors in-process (default; avoids a Ray start-up per run)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report the finished runs")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that stopped early before")
    p.add_argument("--quiet", action="store_true", help="silence the per-run driver output")
    p.add_argument("--name", default="experiment", help="report file names: <out>/<name>.md, .json and .png")
    p.add_argument("--sweep", default=None, help="KEY=V1,V2,...: run every arm at each value (one cell each)")
    p.add_argument("--jobs", type=int, default=1, help="inline runs side by side, each in its own process")
    p.add_argument("--headline", default=None, help="CELL,CELL,...: also draw <out>/<name>-headline.png, accuracy "
                   "against rollouts for just these cells (mean and min-max over seeds)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every arm, e.g. solver.beta=0.1")
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if not key or not values:
            p.error(f"--sweep looks like KEY=V1,V2, got {args.sweep!r}")
        args.arm_list = [f"{arm} {key}={v.strip()}" for v in values.split(",") for arm in args.arm_list]
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.config = args.config.resolve()
    if args.rollouts < 0:
        p.error(f"--rollouts must be >= 0, got {args.rollouts}")
    if args.rollouts:  # an override like any other, so it is part of every run's key in the index
        args.overrides.append(f"run.total_rollouts={args.rollouts}")
    return args


def reproducing_args(argv: list[str]) -> list[str]:
    """The arguments that reproduce the runs: --report-only and --retry-failed only change what runs this time."""
    return [arg for arg in argv if arg not in ("--report-only", "--retry-failed")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "scripts/experiment.py", *reproducing_args(argv)])
    records, failed = run_all(args)
    by_arm = collect(records)
    if not by_arm:
        print("experiment: no finished runs to report", flush=True)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / f"{args.name}.md", by_arm, args, command, failed)
    write_json(out / f"{args.name}.json", by_arm, args, command, failed)
    write_plot(out / f"{args.name}.png", by_arm, args.arm_list, failed)
    if args.headline:
        write_headline_plot(out / f"{args.name}-headline.png", by_arm, args.headline.split(","),
                            f"{world_name(args.config)} world: held-out accuracy against rollouts")
    print((out / f"{args.name}.md").read_text(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
