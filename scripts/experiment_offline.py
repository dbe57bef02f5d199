"""Offline eva against offline static training, over seeds and losses, at equal responses generated.

    python scripts/experiment_offline.py --config configs/cipher-offline.yaml --name experiment-cipher-offline \
        --losses dpo,simpo --loss-override simpo:offline.lr=1e-3 --seeds 3 --jobs 2

Arms (each a set of overrides on the config; T = ``offline.iterations`` of the config):

- ``static``: every iteration trains on fresh prompts of D (the paper's baseline), T iterations.
- ``eva``: iterations after the first train on a set evolved from the last one, its informativeness measured with
  fresh responses of the policy just trained (one more response pass per iteration: 2T - 1 passes in all).
- ``eva_reuse``: the same, informativeness read from the responses the last set was trained on (T passes).
- ``static_long``: static for 2T - 1 iterations: the responses ``eva`` spends.
- ``eva_reuse_long``: ``eva_reuse`` for 2T - 1 iterations: ``static_long``'s responses and iterations.

Every run is an ``eva-ray run --inline`` of its own (a subprocess); a finished run (its ``summary.json`` holds all
its iterations) is kept and not run again. The report (Markdown, JSON, plot) goes to ``docs/<name>.*``: held-out
accuracy (greedy, and the exact expected accuracy of sampled answers) after every iteration, against the responses
generated so far, mean and spread over seeds.
A run that fails stops the experiment with its last output; the runs already finished are kept for the next try.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARMS = ("static", "eva", "eva_reuse", "static_long", "eva_reuse_long")


def arm_overrides(arm: str, iterations: int) -> list[str]:
    return {
        "static": ["offline.arm=static"],
        "eva": ["offline.arm=eva", "offline.estimate=fresh"],
        "eva_reuse": ["offline.arm=eva", "offline.estimate=reuse"],
        "static_long": ["offline.arm=static", f"offline.iterations={2 * iterations - 1}"],
        "eva_reuse_long": ["offline.arm=eva", "offline.estimate=reuse", f"offline.iterations={2 * iterations - 1}"],
    }[arm]


def run_dir_of(runs: Path, loss: str, arm: str, seed: int, overrides: list[str]) -> Path:
    """Where a run lives: its cell, seed and a digest of its overrides (other settings never reuse its results)."""
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return runs / f"{loss}-{arm}-seed{seed}-{digest}"


def finished(out: Path) -> dict | None:
    """The summary of the finished run under ``out``, or None."""
    for summary_file in sorted(out.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        config = (summary_file.parent / "config.yaml").read_text()
        wanted = int(next(line.split(":")[1] for line in config.splitlines() if line.strip().startswith("iterations:")))
        if len(summary["iterations"]) == wanted and not summary.get("interrupted"):
            return summary
    return None


def run_one(args: argparse.Namespace, loss: str, arm: str, seed: int, iterations: int) -> dict:
    settings = [str(args.config), *args.overrides, *args.per_loss.get(loss, [])]
    out = run_dir_of(args.runs_dir, loss, arm, seed, settings)
    summary = finished(out) if out.exists() else None
    if summary is None:
        cmd = [sys.executable, "-m", "launch", "run", "--inline", "--config", str(args.config), *args.overrides,
               f"solver.algorithm={loss}", *args.per_loss.get(loss, []), *arm_overrides(arm, iterations),
               f"run.seed={seed}",
               f"run.output_dir={out}", f"run.name={loss}-{arm}", "logging.progress=false"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
        if done.returncode != 0:
            raise RuntimeError(f"{loss} {arm} seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        summary = finished(out)
        print(f"[{loss} {arm} seed {seed}] done in {time.perf_counter() - start:.0f}s", flush=True)
    return {"loss": loss, "arm": arm, "seed": seed, "summary": summary}


def points(summary: dict, key: str) -> list[tuple[int, float]]:
    """(responses generated, held-out ``key``) at the start and after every iteration."""
    out = [(0, summary["eval_start"][key])] if key in summary.get("eval_start", {}) else []
    return out + [(it["responses_total"], it["eval"][key]) for it in summary["iterations"] if key in it["eval"]]


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f}" if s["n"] == 1 else f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"


def cell_table(runs: list[dict]) -> dict[str, Any]:
    """Per (loss, arm): final accuracy / expected accuracy over seeds, responses, pairs and seconds per iteration."""
    out: dict[str, Any] = {}
    for run in runs:
        out.setdefault(run["loss"], {}).setdefault(run["arm"], []).append(run)
    table: dict[str, Any] = {}
    for loss, arms in out.items():
        for arm, seeds in arms.items():
            finals = [s["summary"]["iterations"][-1]["eval"] for s in seeds]
            its = [s["summary"]["iterations"] for s in seeds]
            table.setdefault(loss, {})[arm] = {
                "seeds": [s["seed"] for s in seeds],
                "accuracy": stats([f["accuracy"] for f in finals]),
                "expected_accuracy": stats([f["expected_accuracy"] for f in finals]),
                "accuracy_by_level": {k: stats([f[k] for f in finals]) for k in sorted(finals[0])
                                      if k.startswith("accuracy_level_")},
                "responses": sorted({s["summary"]["responses"] for s in seeds}),
                "pairs_per_iteration": [statistics.fmean(i[t]["pairs"] for i in its) for t in range(len(its[0]))],
                "seconds_per_iteration": statistics.fmean(it["seconds"] for i in its for it in i),
                "curves": {key: [points(s["summary"], key) for s in seeds]
                           for key in ("accuracy", "expected_accuracy")},
            }
    return table


def write_report(args: argparse.Namespace, table: dict[str, Any], command: str) -> None:
    docs = args.out
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{args.name}.json").write_text(json.dumps({"command": command, "config": str(args.config),
                                                        "overrides": args.overrides, "per_loss": args.per_loss,
                                                        "cells": table}, indent=1))
    lines = [f"# {args.name}: offline eva against offline static training", "",
             f"Command: `{command}`", "",
             "Held-out accuracy after the last iteration, mean ± std [min-max] over seeds (greedy accuracy, and the "
             "exact expected accuracy of a sampled answer, teacher-forced). Responses: every response generated, "
             "informativeness passes included (the cost).", ""]
    for loss, arms in table.items():
        lines += [f"## {loss}", "", "| arm | responses | accuracy | expected accuracy | pairs per iteration | "
                  "s per iteration |", "|---|---|---|---|---|---|"]
        for arm in ARMS:
            if arm in arms:
                c = arms[arm]
                lines.append(f"| {arm} | {', '.join(map(str, c['responses']))} | {fmt(c['accuracy'])} | "
                             f"{fmt(c['expected_accuracy'])} | {', '.join(f'{p:.0f}' for p in c['pairs_per_iteration'])}"
                             f" | {c['seconds_per_iteration']:.0f} |")
        lines.append("")
    lines += ["![held-out expected accuracy against responses generated](" + f"{args.name}.png)", ""]
    md = docs / f"{args.name}.md"
    reading = ""
    if md.exists() and "\n## Reading" in md.read_text():  # the human reading survives a regenerated report
        reading = md.read_text()[md.read_text().index("\n## Reading"):]
    md.write_text("\n".join(lines) + reading)
    write_plot(docs / f"{args.name}.png", table)


def write_plot(path: Path, table: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(table)
    fig, axes = plt.subplots(2, len(losses), figsize=(5.5 * len(losses), 7), squeeze=False)
    for col, loss in enumerate(losses):
        for row, key in enumerate(("expected_accuracy", "accuracy")):
            ax = axes[row][col]
            for arm in ARMS:
                if arm not in table[loss]:
                    continue
                curves = table[loss][arm]["curves"][key]
                n = min(len(c) for c in curves)
                xs = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
                ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
                # static_long's first T iterations are static's (the same slices of D): dashed, so both show.
                line, = ax.plot(xs, ys, marker="o", label=arm, linestyle="--" if arm.endswith("_long") else "-")
                for c in curves:
                    ax.plot([p[0] for p in c], [p[1] for p in c], color=line.get_color(), alpha=0.2, lw=0.8)
            ax.set_title(f"{loss}: held-out {key.replace('_', ' ')}")
            ax.set_xlabel("responses generated")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def iterations_of(config: Path, overrides: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    from eva_ray.config import load_config

    return load_config(config, overrides).offline.iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cipher-offline.yaml")
    parser.add_argument("--name", default="experiment-cipher-offline")
    parser.add_argument("--losses", default="dpo,simpo")
    parser.add_argument("--loss-override", action="append", default=[], metavar="LOSS:PATH=VALUE",
                        help="an override for one loss's runs only (repeatable), e.g. simpo:offline.lr=1e-3")
    parser.add_argument("--arms", default=",".join(ARMS[:4]))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "experiment-offline")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the report goes")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (dotted.path=value)")
    args = parser.parse_args(argv)
    args.per_loss = {}
    for item in args.loss_override:
        loss, sep, override = item.partition(":")
        if not sep or "=" not in override:
            parser.error(f"--loss-override: {item!r} is not LOSS:path=value")
        args.per_loss.setdefault(loss, []).append(override)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; allowed: {', '.join(ARMS)}")
    iterations = iterations_of(args.config, args.overrides)
    jobs = [(loss, arm, seed) for loss in args.losses.split(",") for arm in arms for seed in range(args.seeds)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(args, *job, iterations), jobs))
    command = "python scripts/experiment_offline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(args, cell_table(runs), command)
    print(f"report: {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
