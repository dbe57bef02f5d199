"""The driver: online eva, one minibatch per step (the paper's Algorithm 1 in its online form, appendix A).

    eva-ray run --config configs/tiny.yaml                       # local Ray, started and stopped by the run
    ray job submit --working-dir . -- python -m launch run --config configs/tiny.yaml   # on a running cluster
    eva-ray run --config configs/tiny.yaml --inline              # no Ray at all: actors as plain objects

Each step reads top to bottom like the algorithm:

    creator step   next_batch  -> prompts from D and from the buffer, as the phase schedule plans
    solver step    generate    -> n responses per prompt from the current policy (rollout group)
                   score       -> rewards (reward actor)
    creator step   report      -> informativeness, parents, evolve started in the background
    solver step    train_step  -> RLOO / OAIF update (learner); weights pushed to the rollout group

With ``run.overlap`` on (the default under Ray), the learner's step overlaps the next step's rollout::

    step t:   train_step(t) on the learner  ||  report(t) -> next_batch(t+1) -> generate(t+1) -> score(t+1)
              -> weights pushed (version after t), stats answered meanwhile

so batch t+1 is sampled by the policy one version behind the one that trains on it (``learner.max_staleness``
bounds the lag, checked before every train step; the learner corrects it with importance weights,
``learner.off_policy_correction``). What lags a step, and what does not:

* the creator plans batch t+1 after ``report(t)``: its phase, its seed draws and its buffer draws see batch t's
  scores and pops, exactly as without overlap; children evolved from batch t can join the buffer only after
  ``next_batch(t+1)`` ran (in the curriculum world they land first; an LLM evolver takes longer than a step
  anyway), so they are drawable from step t + 2 on;
* the informativeness of batch t+1's prompts (their buffer scores, and the parents picked from them) is measured
  on samples of the policy before update t, one version older than without overlap;
* the held-out evaluation after step t uses the weights after update t, as without overlap.

Every planned batch is trained exactly once by the next step: nothing is prepared past the run's last step or
across a checkpoint (a checkpoint's creator state has no batch out), and once SIGTERM asks the run to stop, the
batch already out is trained before the run stops.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eva_ray.atomic import write_json, write_text
from eva_ray.batching import collate
from eva_ray.config import Config, from_dict, read_yaml, to_dict, to_yaml
from eva_ray.data import load_seed_prompts, split_seed_set
from eva_ray.health import CreatorHealth
from eva_ray.losses import get_loss
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout
from eva_ray.tiny import resolve_model_path
from eva_ray.worlds import World, world_of
from launch import checkpoint
from launch.cluster import System, start_system
from launch.handles import gather, set_call_timeout
from launch.metrics import MetricsLogger
from launch.plots import write_plots
from launch.probing import probe_children
from launch.progress import Progress
from launch.reference import comparison_line
from launch.recovery import ActorLost, Restarts, WorkerRestarted, lost_line, resume_command as _resume_command
from launch.storage import StorageError, model_params, space_warning, stop_line, writing
from launch.signals import (Terminated, reset as reset_signals, restore_sigterm, stop_at_step_end, stop_on_sigterm,
                            terminated)


# After an actor died or hung, how long each of the run's closing calls (snapshot, policy, stats) may take.
_FINISH_TIMEOUT_S = 120.0


class StalePolicyError(RuntimeError):
    """A rollout came from a policy older than ``learner.max_staleness`` versions."""


@dataclass
class RunSummary:
    run_dir: str
    steps_done: int = 0
    phases: list[str] = field(default_factory=list)
    """The phase of every step, in order."""
    max_staleness_seen: int = 0
    eval: dict[str, Any] = field(default_factory=dict)
    """The last evaluation (win-rate; accuracy by level in a world)."""
    eval_start: dict[str, Any] = field(default_factory=dict)
    """Accuracy by level of the initial policy (worlds only)."""
    final: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    error: str | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    """Rollout workers and reward actors Ray restarted during the run (each retried its step's call)."""
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """The last checkpoint written: step, path, seconds, bytes."""
    resumed_from: list[int] = field(default_factory=list)
    """The checkpoint step of every ``--resume`` of this run directory."""
    rollouts: int = 0
    """Every rollout generated so far, trained and spent probing (the creator's ``rollouts_total``)."""
    health: dict[str, Any] = field(default_factory=dict)
    """The creator's health over the last ``logging.health_window`` steps (see :mod:`eva_ray.health`)."""
    reference: str | None = None
    """This run next to the world's experiment arms at the same rollouts (:mod:`launch.reference`)."""

    def spent(self, cfg: Config) -> bool:
        """Whether the run's rollout budget (``run.total_rollouts``) is used up."""
        return bool(cfg.run.total_rollouts) and self.rollouts >= cfg.run.total_rollouts

    def write(self, path: Path) -> None:
        with writing("writing the run's summary", path):
            write_json(path, self.__dict__, indent=2, default=str)


def make_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(cfg.run.output_dir) / f"{cfg.run.name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def load_prompts(cfg: Config) -> tuple[list[PromptRecord], list[PromptRecord], str]:
    """(D, held-out prompts, a one-line report): from a built-in world, or from the seed file."""
    world = world_of(cfg)
    if world is not None:
        shares = cfg.world.level_mix
        mix = (dict(world.default_mix) if shares is None else
               {level: share for level, share in zip(world.levels, shares) if share > 0})
        train = world.seed_set(cfg.world.seed_size, mix, seed=cfg.run.seed)
        held_out = world.eval_set(cfg.world.eval_per_level, seed=cfg.world.eval_seed) if cfg.world.eval_per_level else []
        return train, held_out, f"world {world.name}: {len(train)} seed tasks at levels {sorted(mix)}"
    records, report = load_seed_prompts(cfg.data.path, format=cfg.data.format, prompt_field=cfg.data.prompt_field,
                                        id_field=cfg.data.id_field, max_prompt_chars=cfg.data.max_prompt_chars)
    train, held_out = split_seed_set(records, eval_size=cfg.data.eval_size, shuffle=cfg.data.shuffle,
                                     seed=cfg.run.seed, max_prompts=cfg.data.max_prompts)
    return train, held_out, report.summary()


def check_staleness(groups, learner_version: int, max_staleness: int) -> int:
    """The largest lag of any rollout behind the learner; raises past the bound (a silent off-policy drift)."""
    lag = max(learner_version - r.policy_version for group in groups for r in group)
    if lag > max_staleness:
        raise StalePolicyError(f"a rollout lags {lag} policy versions behind the learner (version "
                               f"{learner_version}); learner.max_staleness is {max_staleness}")
    return lag


def rollout_metrics(groups, rewards: list[list[float]], seconds: float) -> dict[str, float]:
    flat = np.array([r for row in rewards for r in row], dtype=float)
    finite = flat[np.isfinite(flat)]
    lengths = np.array([len(r.response_token_ids) for g in groups for r in g], dtype=float)
    stopped = np.array([r.finish_reason == "stop" for g in groups for r in g], dtype=float)
    return {
        "reward_mean": float(finite.mean()) if finite.size else math.nan,
        "reward_std": float(finite.std()) if finite.size else math.nan,
        "reward_nonfinite": int(flat.size - finite.size),
        "response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
        "stop_fraction": float(stopped.mean()),
        "tokens_per_s": float(lengths.sum() / seconds) if seconds > 0 else 0.0,
        "policy_version_min": min(r.policy_version for g in groups for r in g),
    }


class Evaluator:
    """How the policy does on held-out prompts, judged by the reward actor.

    Always: the win-rate of the current policy against the initial one (the initial answers are generated once,
    before the first update; each evaluation samples the current policy's answers to the same prompts; a win is 1,
    a tie 0.5). In a world, also by difficulty level: the accuracy of greedy answers (what the world calls solved)
    and, given the tokenizer, the exact expected accuracy of sampled answers, the mean of pi(answer | prompt) by
    teacher forcing on the learner (no sampling noise).
    """

    def __init__(self, system: System, prompts: list[PromptRecord], *, world: World | None = None,
                 restarts: Restarts | None = None, initial: list[str] | None = None, tokenizer: Any = None) -> None:
        self.system = system
        self.prompts = prompts
        self.world = world
        self.tokenizer = tokenizer
        self._call = restarts.call if restarts is not None else (lambda what, fn: fn())
        # A resumed run brings the initial policy's answers from its checkpoint.
        self.initial = initial if initial is not None else (self._answers() if prompts else [])

    @property
    def by_level(self) -> bool:
        return self.world is not None

    def _answers(self) -> list[str]:
        return [group[0].text for group in self._call("evaluation", lambda: self.system.rollout.generate(
            self.prompts, 1))]

    def accuracy(self) -> dict[str, float]:
        groups = self._call("evaluation", lambda: self.system.rollout.generate(self.prompts, 1, greedy=True))
        result = self._call("evaluation", lambda: gather([self.system.reward.call(
            "score", self.prompts, [[g[0].text] for g in groups])])[0])
        solved = np.array([self.world.solved(row[0]) for row in result.rewards], dtype=float)
        levels = np.array([self.world.difficulty(p) for p in self.prompts])
        out = by_level("accuracy", solved, levels)
        if self.tokenizer is not None:
            out.update(by_level("expected_accuracy", self._answer_probs(groups), levels))
        return out

    def _answer_probs(self, groups: list[list[Rollout]]) -> np.ndarray:
        """pi(answer + end of sequence | prompt) per prompt, teacher-forced on the learner."""
        tok = self.tokenizer
        rows = [[Rollout(prompt_id=p.id, prompt_token_ids=g[0].prompt_token_ids, text=answer, finish_reason="stop",
                         response_token_ids=tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                         policy_version=g[0].policy_version)]
                for p, g, answer in zip(self.prompts, groups, (self.world.answer(p) for p in self.prompts))]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch = collate(rows, [[0.0]] * len(rows), pad)
        logps = self._call("evaluation", lambda: gather([self.system.learner.call("sequence_logprobs", batch)])[0])
        return np.exp(np.asarray(logps, dtype=float))

    def evaluate(self) -> dict[str, float]:
        current = self._answers()
        # hard: a win is 1, a loss 0 and a tie (equal rewards, e.g. both answers right) 0.5.
        wins = self._call("evaluation", lambda: gather([self.system.reward.call(
            "compare", self.prompts, current, self.initial, hard=True)])[0])
        out = {"win_rate": float(np.mean(wins)), "n_prompts": len(self.prompts)}
        if self.by_level:
            out.update(self.accuracy())
        return out


def by_level(name: str, values: np.ndarray, levels: np.ndarray) -> dict[str, float]:
    """``{name: mean, name_level_<d>: mean at level d}``."""
    out = {name: float(values.mean())}
    for level in sorted(set(levels.tolist())):
        out[f"{name}_level_{level}"] = float(values[levels == level].mean())
    return out


def with_resolved_models(cfg: Config) -> Config:
    """The config with model names (``tiny:``, ``world:``, ``smollm2:``) replaced by folders, once, by the driver."""
    seed = cfg.run.seed
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=resolve_model_path(cfg.model.path, seed=seed),
                                  tokenizer=resolve_model_path(cfg.model.tokenizer, seed=seed),
                                  reference=resolve_model_path(cfg.model.reference, seed=seed)),
        reward=dataclasses.replace(cfg.reward, model=resolve_model_path(cfg.reward.model, seed=seed)),
        evolve=dataclasses.replace(cfg.evolve,
                                   local_model_path=resolve_model_path(cfg.evolve.local_model_path, seed=seed)),
    )


def with_world_defaults(cfg: Config) -> Config:
    """A world supplies its own reward function (``world.reward``; the config loader filled in the world's default)
    unless the config names another."""
    world = world_of(cfg)
    if world is not None and cfg.reward.backend == "function" and not cfg.reward.function:
        return dataclasses.replace(cfg, reward=dataclasses.replace(
            cfg.reward, function=world.reward_function(cfg.world.reward)))
    return cfg


def with_resolved_overlap(cfg: Config, *, inline: bool) -> Config:
    """``run.overlap`` and ``learner.off_policy_correction`` with ``auto`` decided, as the run's config records them.

    Overlap is on under Ray when the staleness bound allows a rollout one sync behind; inline, every actor shares
    one process and its threads, so there is nothing to overlap. The correction follows: TIS where rollouts lag.
    """
    overlap = cfg.run.overlap
    if overlap == "auto":
        overlap = "on" if not inline and cfg.learner.max_staleness >= cfg.learner.sync_every else "off"
    correction = cfg.learner.off_policy_correction
    if correction == "auto":
        correction = "tis" if overlap == "on" and get_loss(cfg.solver.algorithm).importance_weights else "none"
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, overlap=overlap),
                               learner=dataclasses.replace(cfg.learner, off_policy_correction=correction))


def _world_tokenizer(cfg: Config) -> Any:
    """The policy's tokenizer in a world run (the evaluation's teacher forcing encodes the answers), else None."""
    if not cfg.world.name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path,
                                         trust_remote_code=cfg.model.trust_remote_code)


def may_prefetch(cfg: Config, step: int) -> bool:
    """Whether the batch of ``step`` may be prepared during the step before: not past the run's end, not across a
    checkpoint (the creator's saved state must have no batch out), not once SIGTERM asked the run to stop."""
    every = cfg.learner.checkpoint_every
    return step < cfg.run.total_steps and not (every and step % every == 0) and not terminated()


def _resume_point(cfg: Config, resume: str | Path) -> tuple[Path, Path, dict[str, Any], list[str]]:
    """(run directory, the checkpoint to resume from, the driver's state there, what was skipped on the way).

    ``resume`` is a run directory (its newest intact checkpoint) or one of its checkpoint folders. The config must
    equal the saved one.
    """
    run_dir, wanted = checkpoint.split_resume_path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise checkpoint.ResumeError(f"{run_dir} is not a run directory (no config.yaml)")
    saved = to_dict(from_dict(read_yaml(run_dir / "config.yaml")))
    path, notes = checkpoint.check_resumable(run_dir, saved, to_dict(cfg), wanted)
    return run_dir, path, json.loads((path / checkpoint.DRIVER_STATE).read_text()), notes


def run(cfg: Config, *, inline: bool = False, echo=print, resume: str | Path | None = None) -> RunSummary:
    """Run online eva for ``cfg.run.total_steps`` steps; everything the run makes lands in its run directory.

    ``resume``: a run directory to continue from its last checkpoint (``eva-ray run --resume RUN_DIR``).
    """
    cfg = with_resolved_overlap(with_world_defaults(with_resolved_models(cfg)), inline=inline)
    train, held_out, data_report = load_prompts(cfg)
    saved: dict[str, Any] = {}
    ckpt_path: Path | None = None
    if resume is not None:
        run_dir, ckpt_path, saved, notes = _resume_point(cfg, resume)
        for note in notes:
            echo(note)
        echo(f"eva-ray: resuming {run_dir} from its checkpoint at step {saved['step']}")
    else:
        run_dir = make_run_dir(cfg)
        echo(f"eva-ray: run directory {run_dir}")
    with writing("writing the run's config", run_dir / "config.yaml"):
        write_text(run_dir / "config.yaml", to_yaml(cfg))
    echo(f"eva-ray: seed set {data_report}; {len(train)} for training, {len(held_out)} held out")
    summary = RunSummary(run_dir=str(run_dir))
    if saved:
        summary = RunSummary(**{**saved["summary"], "run_dir": str(run_dir)})
        summary.resumed_from.append(saved["step"])
    logger = MetricsLogger(run_dir, project=cfg.logging.wandb_project, run_name=run_dir.name, config=to_dict(cfg),
                           mode_setting=cfg.logging.wandb_mode, jsonl=cfg.logging.jsonl,
                           resume_id=saved.get("wandb_id"), resume_step=saved.get("step"))
    if logger.resume_refused:
        echo(logger.resume_refused)
    if logger.torn_lines:
        echo(f"eva-ray: metrics.jsonl ended in {logger.torn_lines} line(s) cut short (a crash or a full disk); "
             "dropped")
    set_call_timeout(cfg.run.call_timeout_s)  # every call the driver waits on: a hung actor is reported
    closing: Exception | None = None  # a write at the run's end that failed
    storage_stop = False  # a write failed: its one line is the last thing the run says (no plots drawn)
    system = None
    evaluator = None
    restarts: Restarts | None = None
    last_checkpoint: int | None = saved.get("step")
    at_boundary = False  # between two steps: the actors' states agree with summary.steps_done
    table_columns = ["step", "id", "parent_id", "operator", "generation", "info", "text"]
    reset_signals()
    previous_sigterm = stop_on_sigterm(cfg.run.sigterm_grace_s)  # SIGTERM is Ctrl-C from here on: outputs written, summary says so

    def save_checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        state = {"summary": dataclasses.asdict(summary), "wandb_id": logger.run_id,
                 "eval_initial": evaluator.initial if evaluator else None}
        info = checkpoint.save(system, run_dir, step, state, keep=cfg.learner.keep_checkpoints)
        summary.checkpoint = info
        last_checkpoint = step
        if info["seconds"]:
            echo(f"eva-ray: checkpoint of step {step}: {info['bytes'] / 1e6:.1f} MB in {info['seconds']:.2f}s")

    try:
        system = start_system(cfg, train, run_dir, inline=inline, echo=echo)
        warning = space_warning(cfg, run_dir, model_params(cfg.model.path), len(train),
                                existing=min(len(checkpoint.checkpoints(run_dir)), cfg.learner.keep_checkpoints))
        if warning:
            echo(warning)
        stop_on_sigterm()  # again: ray.init installs a handler of its own, which would skip all that
        restarts = Restarts(system, max_restarts=cfg.resources.max_restarts, echo=echo,
                            ready_timeout_s=cfg.run.call_timeout_s)
        restarts.counts.update(summary.restarts)
        if ckpt_path is not None:
            _, resumed = checkpoint.restore(system, ckpt_path)
            echo(f"eva-ray: restored step {saved['step']} (policy version {system.learner_version}); evolve "
                 f"requests in flight at the checkpoint: {resumed['reissued']} issued again, {resumed['lost']} lost")
        if held_out:
            evaluator = Evaluator(system, held_out, world=world_of(cfg), restarts=restarts,
                                  initial=saved.get("eval_initial") if saved else None,
                                  tokenizer=_world_tokenizer(cfg))
        if evaluator and evaluator.by_level and not saved:
            summary.eval_start = evaluator.accuracy()
            logger.log(0, {"eval": summary.eval_start})  # step 0 of the learning curve: the initial policy
            echo(f"eva-ray: held-out accuracy before training {_levels(summary.eval_start)}")
        progress = Progress(cfg.run.total_steps, enabled=cfg.logging.progress, echo=echo)
        health = CreatorHealth(world_of(cfg), window=cfg.logging.health_window)
        # Once the rollout budget is spent nothing more is prepared; a batch already out is still trained.
        pipeline = (Pipeline(lambda k: may_prefetch(cfg, k) and not summary.spent(cfg)) if cfg.run.overlap == "on"
                    else None)
        if pipeline is not None:
            echo(f"eva-ray: the next batch is generated while the learner trains (run.overlap on; rollouts one "
                 f"version behind, off-policy correction {cfg.learner.off_policy_correction})")
        at_boundary = True
        if summary.spent(cfg):
            echo(f"eva-ray: the rollout budget ({cfg.run.total_rollouts}) was spent before the checkpoint; "
                 "nothing left to run")
        end = summary.steps_done if summary.spent(cfg) else cfg.run.total_steps
        for step in range(summary.steps_done, end):
            at_boundary = False
            metrics = one_step(cfg, system, step, summary, restarts, pipeline=pipeline, health=health)
            summary.health = metrics["health"] | {"uncovered": health.uncovered()}
            summary.phases.append(metrics.pop("phase_name"))
            summary.rollouts = int(metrics["creator"].get("rollouts_total", 0))
            last = step + 1 == cfg.run.total_steps or (summary.spent(cfg) and not (pipeline and pipeline.ahead))
            if evaluator and ((cfg.logging.eval_every and (step + 1) % cfg.logging.eval_every == 0) or last):
                t0 = time.perf_counter()
                metrics["eval"] = evaluator.evaluate()
                metrics["timing"]["eval_s"] = time.perf_counter() - t0
                summary.eval = metrics["eval"]
            summary.restarts = dict(restarts.counts)
            for group, values in restarts.metrics().items():
                metrics.setdefault(group, {}).update(values)
            if (step + 1) % cfg.logging.log_every == 0 or last:
                logger.log(step + 1, metrics)
            if cfg.creator.snapshot_every and (step + 1) % cfg.creator.snapshot_every == 0:
                with writing("writing the buffer snapshot", run_dir / "buffer.json"):
                    gather([system.creator.call("snapshot", str(run_dir / "buffer.json"))])
                if not last:  # the table survives a crash; the run's end logs the last one below
                    logger.table(step + 1, "creator/evolved_prompts", table_columns,
                                 gather([system.creator.call("evolved_table")])[0])
            summary.steps_done = step + 1
            if pipeline is not None and pipeline.ahead is not None:
                # The next batch is out (planned, generated, scored): the run is not at a boundary a checkpoint
                # can describe until the next step has trained on it. A SIGTERM stops the run after that step.
                progress.update(step + 1, metrics)
                continue
            at_boundary = True
            stop_at_step_end()  # a SIGTERM during the step stops the run here, where a checkpoint is consistent
            if cfg.learner.checkpoint_every and (step + 1) % cfg.learner.checkpoint_every == 0 and not last:
                save_checkpoint(step + 1)
            progress.update(step + 1, metrics)
            if last:
                if step + 1 < cfg.run.total_steps:
                    echo(f"eva-ray: {summary.rollouts} rollouts generated, the budget run.total_rollouts="
                         f"{cfg.run.total_rollouts} is spent: the run ends at step {step + 1}")
                break
        save_checkpoint(summary.steps_done)
        logger.table(summary.steps_done, "creator/evolved_prompts", table_columns,
                     gather([system.creator.call("evolved_table")])[0])
    except KeyboardInterrupt as exc:
        summary.interrupted = True
        why = f"terminated (SIGTERM): {exc}" if isinstance(exc, Terminated) else "interrupted"
        echo(f"eva-ray: {why}; saving what the run has and shutting down")
        if system is not None and at_boundary and summary.steps_done and summary.steps_done != last_checkpoint:
            try:
                save_checkpoint(summary.steps_done)
            except Exception as problem:  # noqa: BLE001 - the outputs below matter more; the last one stands
                echo(f"eva-ray: could not write a checkpoint at step {summary.steps_done}: {problem}")
        if last_checkpoint is not None:
            echo(f"eva-ray: the last checkpoint is step {last_checkpoint}; resume with: "
                 f"{_resume_command(run_dir)}")
    except Exception as exc:
        line = stop_line(exc, run_dir, checkpoint.path_of(run_dir, last_checkpoint),
                         _resume_command(run_dir))
        if line is not None:
            storage_stop = True
            summary.error = f"StorageError: {line}"
            set_call_timeout(min(_FINISH_TIMEOUT_S, cfg.run.call_timeout_s))
            raise StorageError(line) from exc
        line = lost_line(exc, str(run_dir), last_checkpoint)
        if line is not None:
            summary.error = f"ActorLost: {line}"
            # What is left to write must not wait the full timeout again on an actor that is gone or hung.
            set_call_timeout(min(_FINISH_TIMEOUT_S, cfg.run.call_timeout_s))
            raise ActorLost(line) from exc
        summary.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if system is not None:
            summary.final = system.finish(run_dir)
            for problem in summary.final.get("finish_errors", []) if not storage_stop else []:
                echo(f"eva-ray: could not finish one step: {problem}")
        for close in (lambda: summary.write(run_dir / "summary.json"),  # atomic: a full disk keeps the last one
                      lambda: logger.close(summary={"final": summary.final, "steps_done": summary.steps_done})):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - after a storage stop its one line says it all
                closing = closing or (None if storage_stop else exc)
        if system is not None:
            system.shutdown()
        if summary.steps_done and not storage_stop:
            try:
                plots = write_plots(run_dir)
                echo(f"eva-ray: plots {', '.join(p.name for p in plots)}")
            except Exception as exc:  # a plot is a convenience; the run's data is already safe on disk
                echo(f"eva-ray: could not draw the plots ({type(exc).__name__}: {exc})")
        restore_sigterm(previous_sigterm)
        set_call_timeout(None)
    if closing is not None:  # the run itself ended well, but its summary or metrics could not be written
        line = stop_line(closing, run_dir, checkpoint.path_of(run_dir, last_checkpoint),
                         _resume_command(run_dir))
        if line is None:
            raise closing
        raise StorageError(line) from closing
    if cfg.world.name and "accuracy" in summary.eval and not summary.interrupted:
        summary.reference = comparison_line(cfg.world.name, cfg.solver.beta, summary.rollouts,
                                            summary.eval["accuracy"])
    for line in summary_lines(summary):
        echo(line)
    return summary


def _levels(acc: dict[str, float], name: str = "accuracy") -> str:
    per_level = " ".join(f"L{k.rsplit('_', 1)[1]} {v:.2f}" for k, v in acc.items()
                         if k.startswith(f"{name}_level_"))
    return f"{acc[name]:.3f} ({per_level})"


def health_lines(health: dict[str, Any]) -> list[str]:
    """The creator's health over its last window, for the summary; a starving creator says so first."""
    if not health:
        return []
    parts = [f"reward spread on {health['spread_fraction_window']:.0%} of trained prompts"]
    if "coverage" in health:
        parts.append(f"skill coverage {health['coverage']:.0%}")
    parts.append(f"corr(informativeness, p(1-p)) {health['info_learnability_corr']:.2f}, "
                 f"corr(informativeness, p) {health['info_success_corr']:.2f}")
    lines = [f"  creator health (last window): {'; '.join(parts)}"]
    if health.get("starving"):
        lines.append(f"  STARVING: the last window trained on none of these skill units: "
                     f"{', '.join(health.get('uncovered', []))}")
    return lines


def summary_lines(summary: RunSummary) -> list[str]:
    """The end-of-run report: how the phases went, what evolving produced, where the outputs are."""
    counts = {p: summary.phases.count(p) for p in dict.fromkeys(summary.phases)}
    final = summary.final or {}
    creator, buffer = final.get("creator", {}), final.get("buffer", {})
    lines = [f"eva-ray: {'interrupted after' if summary.interrupted else 'done,'} {summary.steps_done} steps, "
             f"{summary.rollouts} rollouts ({', '.join(f'{p} {n}' for p, n in counts.items()) or 'none'})"]
    if creator:
        lines.append(f"  evolve: {creator.get('evolve_requested', 0)} requested, {creator.get('evolve_ok', 0)} ok, "
                     f"{creator.get('evolve_rejected_total', 0)} rejected {creator.get('evolve_rejected', {})}, "
                     f"{creator.get('evolve_failed_total', 0)} failed {creator.get('evolve_failed', {})}")
        if final.get("evolve_tasks_unfinished"):
            lines.append(f"  evolve: {final['evolve_tasks_unfinished']} batches were still at the evolve LLM when the "
                         "run ended (not counted above): the LLM is slower than the run, so fewer or no evolved "
                         "prompts reached the solver")
    if buffer:
        lines.append(f"  buffer: {buffer.get('size', 0)}/{buffer.get('capacity', 0)} prompts, by generation "
                     f"{buffer.get('generations', {})}, by operator {buffer.get('operators', {})}")
    if final.get("buffer_by_generation_and_difficulty"):
        lines.append(f"  buffer composition: {final['buffer_by_generation_and_difficulty']}")
    if summary.eval:
        lines.append(f"  win-rate against the initial policy: {summary.eval['win_rate']:.3f} "
                     f"on {summary.eval['n_prompts']} held-out prompts")
    if summary.eval_start and "accuracy" in summary.eval:
        lines.append(f"  held-out accuracy: start {_levels(summary.eval_start)}")
        lines.append(f"                     end   {_levels(summary.eval)}")
        if "expected_accuracy" in summary.eval_start and "expected_accuracy" in summary.eval:
            lines.append(f"  expected sampled accuracy (teacher-forced): start "
                         f"{_levels(summary.eval_start, 'expected_accuracy')}")
            lines.append(f"                                               end   "
                         f"{_levels(summary.eval, 'expected_accuracy')}")
    lines.extend(health_lines(summary.health))
    if "weight_change" in final:
        lines.append(f"  policy moved {final['weight_change']:.4g} (L2) from its start; version "
                     f"{final.get('learner_version')}")
    lines.append(f"  outputs: {summary.run_dir}")
    if summary.reference:
        lines.append(summary.reference)
    return lines


class Laps:
    """``lap(name)`` records the seconds since the previous lap (or the start) as ``timing[name + "_s"]``."""

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[f"{name}_s"] = now - self._clock
        self._clock = now


@dataclass
class Prepared:
    """A minibatch with its rollouts and rewards, ready for the creator's report and the learner."""

    step: int
    batch: Any
    groups: list
    result: Any
    timing: dict[str, float]


def prepare(cfg: Config, system: System, step: int, retry) -> Prepared:
    """The creator's minibatch for ``step``, generated by the rollout group and scored by the reward actor."""
    lap = Laps()
    batch = gather([system.creator.call("next_batch", step)])[0]
    lap("next_batch")

    def generate():
        out = system.rollout.generate(batch.prompts, cfg.solver.n_responses)
        if system.synced_version > 0 and min(r.policy_version for g in out for r in g) < system.synced_version:
            raise WorkerRestarted("a rollout came from the starting policy after a sync")  # a silent restart
        return out

    groups = retry("generate", generate)
    lap("generate")
    result = retry("reward", lambda: gather([system.reward.call("score", batch.prompts,
                                                                 [[r.text for r in g] for g in groups])])[0])
    lap("reward")
    return Prepared(step, batch, groups, result, lap.timing)


@dataclass
class Pipeline:
    """Rollout overlapped with learning (``run.overlap``): while the learner trains on step t, the next step's
    batch is planned, generated with the weights the rollout group has (one version behind) and scored.

    ``may_prefetch(step)`` says whether the batch of ``step`` may be prepared ahead; the driver refuses at the
    run's end, before a checkpoint (whose creator state must have no batch out) and once a stop was asked for, so
    a prepared batch is always trained by the next step.
    """

    may_prefetch: Any
    ahead: Prepared | None = None


def one_step(cfg: Config, system: System, step: int, summary: RunSummary,
             restarts: Restarts | None = None, *, pipeline: Pipeline | None = None,
             health: CreatorHealth | None = None) -> dict[str, Any]:
    """One step of online eva; returns its metrics (namespaced: train/, rollout/, buffer/, creator/, timing/).

    With ``restarts``, a rollout worker or the reward actor that dies during its call is waited for (Ray restarts
    it), resynced, and the call retried. With ``pipeline``, the step trains on the batch the previous step
    prepared (if any) and prepares the next one while the learner trains; ``timing/prefetch_s`` is that overlapped
    work, ``timing/train_s`` only the wait for the learner left after it (the learner's own time is
    ``timing/learner_s``), ``next_batch_s`` / ``generate_s`` / ``reward_s`` describe this step's batch wherever it was
    prepared, and ``timing/step_s`` is the step's wall time.
    """
    retry = restarts.call if restarts is not None else (lambda what, fn: fn())
    start = time.perf_counter()
    lap = Laps()
    timing = lap.timing
    if pipeline is not None and pipeline.ahead is not None:
        if pipeline.ahead.step != step:
            raise RuntimeError(f"step {step}: the prepared batch is step {pipeline.ahead.step}'s")
        ready, pipeline.ahead = pipeline.ahead, None
    else:
        ready = prepare(cfg, system, step, retry)
    lap.restart()
    timing.update(ready.timing)
    groups, result = ready.groups, ready.result
    # Checked against the learner as it is now, just before training: a prepared batch lags by the updates since.
    summary.max_staleness_seen = max(summary.max_staleness_seen,
                                     check_staleness(groups, system.learner_version, cfg.learner.max_staleness))
    # The learner starts first (it needs nothing from the creator), so the report overlaps training too. The report
    # still comes before the next batch is planned, so the creator plans step t + 1 knowing step t's scores.
    training = system.learner.call("train_step", collate(groups, result.rewards, system.pad_token_id))
    report = gather([system.creator.call("report", step, result.rewards)])[0]
    lap("report")
    # creator.child_scoring=probe: children evolved so far are measured before the next batch can draw them.
    probe = probe_children(cfg, system, step + 1, retry)
    if probe:
        lap("probe")
    if pipeline is not None and pipeline.may_prefetch(step + 1):
        pipeline.ahead = prepare(cfg, system, step + 1, retry)
        lap("prefetch")
    train_metrics = gather([training])[0]
    system.learner_version = int(train_metrics["train/version"])
    lap("train")
    sync: dict[str, float] = {}
    asked = system.creator.call("stats")  # answered while the weights are pushed
    # A step that applied no update (no reward spread, a non-finite loss) left the weights as the workers have them.
    if (step + 1) % cfg.learner.sync_every == 0 and system.learner_version != system.synced_version:
        # After a restart the recovery itself resynced: nothing left to send.
        stats = retry("weight sync", lambda: system.sync_weights() if system.synced_version != system.learner_version
                      else {"bytes": 0, "buckets": 0, "seconds": 0.0})
        lap("sync")
        sync = {"sync_bytes": stats["bytes"], "sync_buckets": stats["buckets"],
                "sync_mb_per_s": stats["bytes"] / (1 << 20) / stats["seconds"] if stats["seconds"] > 0 else 0.0,
                **({"sync_verified": stats["verified"]} if "verified" in stats else {})}
    creator_stats = gather([asked])[0]
    lap("stats")
    timing["step_s"] = time.perf_counter() - start
    return {
        "train": {k.removeprefix("train/"): v for k, v in train_metrics.items() if k.startswith("train/")},
        "rollout": rollout_metrics(groups, result.rewards, timing["generate_s"]),
        "buffer": creator_stats["buffer"],
        "creator": creator_stats["creator"],
        "timing": timing | {k.removeprefix("timing/"): v for k, v in train_metrics.items()
                            if k.startswith("timing/")},
        "perf": sync,
        "health": health.update(ready.batch.prompts, result.rewards, report["scores"]) if health else {},
        **({"probe": probe} if probe else {}),
        "phase_name": creator_stats["phase_name"],
    }
