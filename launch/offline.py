"""Offline eva: the paper's iterative preference optimisation on the online run's actors (``run.mode=offline``).

Each iteration t (arXiv 2411.00062, appendix "Iterative Training Settings for Offline eva"):

1. **The set.** Iteration 1, and every iteration of the static arm, takes the next ``offline.prompts_per_iteration``
   prompts of D. The eva arm instead scores iteration t-1's set by informativeness (``offline.metric``, A_min) from
   k responses of the policy just trained (``offline.estimate``), draws a share of it weighted by the scores,
   evolves each drawn prompt on the creator actor and mixes children and old prompts into a set of the same size.
2. **Responses.** The rollout group (every worker) generates k responses per prompt, the reward actor scores them,
   shard by shard (``offline.shard_prompts``); every finished shard is a Parquet file.
3. **Pairs.** Best vs worst response per prompt (SPPO: with each one's probability of beating the policy as its
   target); with ``offline.rewrite`` the evolve LLM rewrites each chosen response first.
4. **Training.** ``epochs`` passes over the pairs in batches of ``batch_size``, from the policy the previous
   iteration ended with, against that policy as the reference, with a fresh optimizer and LR schedule; a learner
   checkpoint every ``offline.checkpoint_every`` updates and at each epoch's end.
5. The policy is saved (``iter-t/policy``), the rollout workers receive its weights, held-out figures are taken.

``eva-ray run --resume RUN_DIR`` continues a killed run: finished iterations are skipped, finished shards kept, and
training continues from the iteration's last checkpoint, so no update is applied twice. The data layout is
:mod:`eva_ray.offline.store`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eva_ray.atomic import staged_dir, write_json, write_text
from eva_ray.batching import collate
from eva_ray.config import Config, ConfigError, to_dict, to_yaml
from eva_ray.informativeness import score_prompts
from eva_ray.losses import get_loss
from eva_ray.offline.next_set import draw_informative, fresh_slice, mix_next_set
from eva_ray.offline.pairs import best_worst_pairs, bradley_terry_matrix, win_probabilities
from eva_ray.offline.recipe import Recipe, for_learner, resolve_recipe
from eva_ray.offline.store import SHARD_KINDS, IterationStore, groups_of, responses_on_disk
from eva_ray.records import PromptRecord
from eva_ray.rollouts import Rollout
from eva_ray.worlds import world_of
from launch.checkpoint import config_changes
from launch.cluster import System, start_system
from launch.driver import (Evaluator, _levels, _world_tokenizer, load_prompts, make_run_dir, with_resolved_models,
                           with_world_defaults)
from launch.handles import gather, set_call_timeout
from launch.metrics import MetricsLogger
from launch.recovery import ActorLost, Restarts, WorkerRestarted, lost_line, resume_command
from launch.signals import reset as reset_signals
from launch.signals import restore_sigterm, stop_at_step_end, stop_on_sigterm, terminated
from launch.storage import model_params, space_warning

STATE_FILE = "offline/state.json"
WORKER_STATS = ("responses", "prompts", "tokens_generated")
KEPT = "finished shards and the last checkpoint are kept"


@dataclass
class OfflineSummary:
    run_dir: str
    arm: str
    loss: str
    iterations: list[dict[str, Any]] = field(default_factory=list)
    """Per finished iteration: its set, responses, pairs, updates, seconds and held-out figures."""
    eval_start: dict[str, Any] = field(default_factory=dict)
    responses: int = 0
    """Responses generated so far, estimation passes included (the equal-cost measure)."""
    resumed: int = 0
    interrupted: bool = False
    workers: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per rollout worker of this process's part of the run: responses and tokens it generated, calls."""
    placement: list[dict[str, Any]] = field(default_factory=list)
    """Where each actor landed under Ray (empty inline)."""

    def write(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self), indent=2, default=float)


class Eta:
    """One progress line per unit of work: done/total, rate and the time left."""

    def __init__(self, what: str, total: int, echo: Callable[[str], None], enabled: bool = True) -> None:
        self.what, self.total, self.echo, self.enabled = what, total, echo, enabled
        self.start = time.monotonic()
        self.done = 0

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        left = (self.total - done) * elapsed / done if done else float("nan")
        line = f"eva-ray: {self.what} {done}/{self.total}"
        if done:
            line += f"{' ' + extra if extra else ''} | {elapsed:.0f}s, ETA {left:.0f}s"
        self.echo(line)


# --------------------------------------------------------------------------------------------------- the loop


class OfflineRun:
    """The state of one offline run between its iterations; :func:`run_offline` drives it."""

    def __init__(self, cfg: Config, recipe: Recipe, system: System, run_dir: Path, train: list[PromptRecord],
                 restarts: Restarts, logger: MetricsLogger, echo: Callable[[str], None], tokenizer: Any,
                 summary: OfflineSummary) -> None:
        self.cfg, self.recipe, self.system, self.run_dir = cfg, recipe, system, run_dir
        self.summary = summary
        self.seed_set, self.restarts, self.logger, self.echo = train, restarts, logger, echo
        self.tokenizer = tokenizer
        self.spec = get_loss(cfg.solver.algorithm)
        self.off = cfg.offline

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return self.restarts.call(what, fn)

    # ----------------------------------------------------------------------------------------------- the set

    def prompt_set(self, t: int, store: IterationStore) -> tuple[list[PromptRecord], dict[str, Any]]:
        """Iteration ``t``'s set, made now or read back; and the figures of how it was made."""
        if store.has_prompts():
            return store.prompts(), store.manifest()["made"]
        n = self.off.prompts_per_iteration
        if t == 1 or self.off.arm == "static":
            records, passes = fresh_slice(self.seed_set, t, n, self.cfg.run.seed)
            if passes > 1:
                self.echo(f"eva-ray: iteration {t}: D ({len(self.seed_set)} prompts) is used up; its prompts repeat "
                          f"(pass {passes} over D)")
            made = {"how": "seed", "passes_over_d": passes, "evolved": 0, "kept": 0}
        else:
            records, made = self.evolved_set(t, store)
        store.write_prompts(records, made)
        return records, made

    def evolved_set(self, t: int, store: IterationStore) -> tuple[list[PromptRecord], dict[str, Any]]:
        previous = IterationStore(self.run_dir, t - 1)
        current = previous.prompts()
        if self.off.estimate == "fresh":
            rows = self.responses(store, "estimate", current, f"iteration {t}: informativeness of the last set")
        else:
            rows = previous.read_shards("responses", len(previous.shard_bounds(len(current), self.off.shard_prompts)))
        ids, _, rewards = groups_of(rows)
        by_id = dict(zip(ids, rewards))
        rewards = [by_id[r.id] for r in current]
        scores = score_prompts(rewards, self.off.metric).scores
        steer = self.cfg.evolve.method == "curriculum" and self.cfg.evolve.steer_by_success
        for record, score, row in zip(current, scores, rewards):
            if np.isfinite(score):
                record.info, record.info_measured = float(score), True
            if steer:  # the curriculum evolver steers a parent by how often the solver solved it
                finite = [float(r) for r in row if np.isfinite(r)]
                record.meta["success_rate"] = float(np.mean(finite)) if finite else None
        rng = np.random.default_rng([self.cfg.run.seed, t])
        draw = draw_informative(current, scores, self.off.info_fraction, rng)
        if draw.uniform_fallback:
            self.echo(f"eva-ray: iteration {t}: no prompt of the last set showed a reward spread; the evolve step "
                      "draws its parents uniformly")
        t0 = time.perf_counter()
        out = gather([self.system.creator.call("evolve_set", draw.parents, self.off.children, t)])[0]
        children = [PromptRecord.from_dict(c) for c in out["children"]]
        store.write_children(children)
        counts = out["counts"]
        mix = mix_next_set(children, current, self.off.prompts_per_iteration, self.off.evolved_share, rng)
        made = {"how": "evolved", "parents": len(draw.parents), "parents_positive": draw.positive,
                "uniform_fallback": draw.uniform_fallback, "informative_fraction": float(np.mean(scores > 0)),
                "evolve_requested": counts["requested"], "evolve_ok": counts["ok"],
                "evolve_rejected": sum(counts["rejected"].values()), "evolve_failed": sum(counts["failed"].values()),
                "evolve_s": time.perf_counter() - t0, "evolved": mix.evolved, "kept": mix.kept, "short": mix.short}
        self.echo(f"eva-ray: iteration {t}: evolved {counts['ok']} children from {len(draw.parents)} parents "
                  f"({made['evolve_rejected']} rejected, {made['evolve_failed']} failed); the set is {mix.evolved} "
                  f"evolved + {mix.kept} kept" + (f" ({mix.short} short of the evolved share)" if mix.short else ""))
        return mix.prompts, made

    # ------------------------------------------------------------------------------------------ responses

    def responses(self, store: IterationStore, kind: str, prompts: list[PromptRecord], what: str
                  ) -> list[dict[str, Any]]:
        """k scored responses per prompt, shard by shard; shards already on disk are kept, not generated again."""
        bounds = store.shard_bounds(len(prompts), self.off.shard_prompts)
        done = set(store.done_shards(kind, len(bounds)))
        if done:
            self.echo(f"eva-ray: {what}: {len(done)} of {len(bounds)} shards already on disk, kept")
        eta = Eta(what + ": shards", len(bounds) - len(done), self.echo, self.cfg.logging.progress)
        k = self.off.responses_per_prompt
        for index, (start, end) in enumerate(bounds):
            if index in done:
                continue
            part = prompts[start:end]
            call = shard_call(self.cfg.offline, store.iteration, kind, index)

            def generate(part=part, call=call):
                # Each shard samples from a seed of its own, whatever ran in the process before it: a resumed run
                # generates the shards it lacks exactly as the uninterrupted run would have.
                gather([w.call("resume_calls", call) for w in self.system.rollout.workers])
                out = self.system.rollout.generate(part, k)
                if min(r.policy_version for g in out for r in g) < self.system.synced_version:
                    raise WorkerRestarted("a rollout came from an older policy than the one synced")
                return out

            groups = self._call("generate", generate)
            texts = [[r.text for r in g] for g in groups]
            result = self._call("reward", lambda part=part, texts=texts: gather(
                [self.system.reward.call("score", part, texts)])[0])
            store.write_shard(kind, index, groups, result.rewards)
            stop_at_step_end()  # a SIGTERM during the shard stops the run here, with the shard kept
            eta.update(eta.done + 1, f"(reward mean {np.nanmean(np.asarray(result.rewards, dtype=float)):.3f})")
        return store.read_shards(kind, len(bounds))

    # ----------------------------------------------------------------------------------------------- pairs

    def make_pairs(self, store: IterationStore, prompts: list[PromptRecord], rows: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
        if store.has_pairs():
            return store.pairs()
        by_id = {p.id: p for p in prompts}
        ids, groups, rewards = groups_of(rows)
        pairs = best_worst_pairs(rewards)
        targets = self.targets(ids, groups, rewards, by_id)
        out = []
        for pair in pairs:
            group, row = groups[pair.prompt_index], rewards[pair.prompt_index]
            chosen, rejected = group[pair.chosen], group[pair.rejected]
            target = targets[pair.prompt_index]
            out.append({"prompt_id": chosen.prompt_id, "prompt": by_id[chosen.prompt_id].prompt_text,
                        "chosen": chosen.text, "rejected": rejected.text, "chosen_reward": row[pair.chosen],
                        "rejected_reward": row[pair.rejected], "chosen_target": target[pair.chosen],
                        "rejected_target": target[pair.rejected], "prompt_token_ids": chosen.prompt_token_ids,
                        "chosen_token_ids": chosen.response_token_ids,
                        "rejected_token_ids": rejected.response_token_ids, "rewritten": False,
                        "original_chosen": None})
        if self.off.rewrite and out:
            self.rewrite(out, by_id)
        store.write_pairs(out)
        return out

    def targets(self, ids: list[str], groups: list[list[Rollout]], rewards: list[list[float]],
                by_id: dict[str, PromptRecord]) -> list[list[float]]:
        """What each response's ``rewards`` entry holds for the loss: its reward, or (SPPO) P(y > pi)."""
        if self.spec.targets == "rewards":
            return rewards
        pairwise = self.off.win_rates == "pairwise" or (self.off.win_rates == "auto"
                                                        and self.cfg.reward.backend == "pairwise")
        if not pairwise:
            return [win_probabilities(bradley_terry_matrix(row)).tolist() for row in rewards]
        # Every unordered pair of every prompt in one call: the pairwise model judges both orders itself.
        index = [(p, i, j) for p, group in enumerate(groups) for i in range(len(group))
                 for j in range(i + 1, len(group))]
        probs = self._call("reward", lambda: gather([self.system.reward.call(
            "compare", [by_id[ids[p]] for p, _, _ in index], [groups[p][i].text for p, i, _ in index],
            [groups[p][j].text for p, _, j in index])])[0])
        matrices = [np.full((len(group), len(group)), 0.5) for group in groups]
        unjudged = 0
        for (p, i, j), prob in zip(index, probs):
            if np.isfinite(prob) and 0.0 <= prob <= 1.0:
                matrices[p][i, j], matrices[p][j, i] = prob, 1.0 - prob
            else:  # a comparison the model could not make states no preference
                unjudged += 1
        if unjudged:
            self.echo(f"eva-ray: {unjudged} of {len(index)} pairwise comparisons gave no probability; counted as "
                      "ties")
        return [win_probabilities(m).tolist() for m in matrices]

    def rewrite(self, pairs: list[dict[str, Any]], by_id: dict[str, PromptRecord]) -> None:
        """Replace each chosen response by the evolve LLM's rewrite of it, where one passed the checks."""
        result = gather([self.system.creator.call("rewrite", [by_id[p["prompt_id"]] for p in pairs],
                                                  [p["chosen"] for p in pairs])])[0]
        eos = self.tokenizer.eos_token_id
        for pair, text in zip(pairs, result["texts"]):
            if text is None:
                continue
            pair["original_chosen"], pair["chosen"], pair["rewritten"] = pair["chosen"], text, True
            pair["chosen_token_ids"] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        self.echo(f"eva-ray: rewrote {sum(p['rewritten'] for p in pairs)} of {len(pairs)} chosen responses "
                  f"({result['counts']})")

    # -------------------------------------------------------------------------------------------- training

    def batches(self, pairs: list[dict[str, Any]], t: int, epoch: int) -> list[list[dict[str, Any]]]:
        order = np.random.default_rng([self.cfg.run.seed, t, epoch]).permutation(len(pairs))
        size = self.recipe.batch_size
        return [[pairs[i] for i in order[start:start + size]] for start in range(0, len(pairs), size)]

    def as_groups(self, batch: list[dict[str, Any]]) -> tuple[list[list[Rollout]], list[list[float]], int]:
        """Each pair as a prompt group of two (chosen first), cut to the recipe's lengths; and how many were cut."""
        groups, targets, cut = [], [], 0
        room_prompt = self.recipe.max_prompt_length
        for pair in batch:
            prompt = list(pair["prompt_token_ids"])[-room_prompt:]
            room = self.recipe.max_length - len(prompt)
            group = []
            for side in ("chosen", "rejected"):
                ids = list(pair[f"{side}_token_ids"])
                cut += len(ids) > room or len(prompt) < len(pair["prompt_token_ids"])
                group.append(Rollout(prompt_id=pair["prompt_id"], prompt_token_ids=prompt, text=pair[side],
                                     response_token_ids=ids[:room], finish_reason="stop", policy_version=0))
            groups.append(group)
            targets.append([pair["chosen_target"], pair["rejected_target"]])
        return groups, targets, cut

    def train(self, t: int, store: IterationStore, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        learner = self.system.learner
        per_epoch = math.ceil(len(pairs) / self.recipe.batch_size)
        total = per_epoch * self.recipe.epochs
        reference = None if t == 1 else str(IterationStore(self.run_dir, t - 1).policy_dir)
        gather([learner.call("begin_iteration", total, reference)])
        state = store.train_state() or {"epoch": 0, "batch": 0, "updates": 0}
        if state["updates"]:
            version = gather([learner.call("load_checkpoint", str(store.checkpoint_dir))])[0]
            self.system.learner_version = int(version)
            self.echo(f"eva-ray: iteration {t}: training resumes after update {state['updates']} of {total} "
                      f"(epoch {state['epoch'] + 1}, batch {state['batch']})")
        eta = Eta(f"iteration {t}: updates", total - state["updates"], self.echo, self.cfg.logging.progress)
        every = self.off.checkpoint_every
        losses: list[float] = []
        cut = 0
        for epoch in range(state["epoch"], self.recipe.epochs):
            batches = self.batches(pairs, t, epoch)
            first = state["batch"] if epoch == state["epoch"] else 0
            for index in range(first, len(batches)):
                groups, targets, n_cut = self.as_groups(batches[index])
                cut += n_cut
                metrics = gather([learner.call("train_step", collate(groups, targets, self.system.pad_token_id))])[0]
                self.system.learner_version = int(metrics["train/version"])
                state = {"epoch": epoch, "batch": index + 1, "updates": state["updates"] + 1}
                losses.append(metrics.get("train/loss", float("nan")))
                self.logger.log(self.system.learner_version, _grouped(metrics) | {"offline": {"iteration": t,
                                                                                               "epoch": epoch + 1}})
                end_of_epoch = index + 1 == len(batches)
                if end_of_epoch:
                    state = {"epoch": epoch + 1, "batch": 0, "updates": state["updates"]}
                if end_of_epoch or (every and state["updates"] % every == 0) or terminated():
                    self.checkpoint(store, state)
                stop_at_step_end()  # after a SIGTERM: stopped with this update checkpointed
                eta.update(eta.done + 1, f"(epoch {epoch + 1}/{self.recipe.epochs}, loss {losses[-1]:.4g})")
        return {"updates": total, "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None, "pairs_cut": cut}

    def checkpoint(self, store: IterationStore, state: dict[str, Any]) -> None:
        """The learner's full state, then the position it belongs to: a kill between the two repeats no update."""
        with staged_dir(store.checkpoint_dir, create=False) as staging:
            gather([self.system.learner.call("save_checkpoint", str(staging))])
        store.write_train_state(state)

    # ------------------------------------------------------------------------------------------- iteration

    def iteration(self, t: int, evaluator: Evaluator | None) -> dict[str, Any]:
        start = time.perf_counter()
        store = IterationStore(self.run_dir, t)
        prompts, made = self.prompt_set(t, store)
        rows = self.responses(store, "responses", prompts, f"iteration {t}: responses")
        pairs = self.make_pairs(store, prompts, rows)
        if pairs:
            trained = self.train(t, store, pairs)
        else:  # the eva arm can still evolve easier prompts from this set; the static arm's next slice may do better
            self.echo(f"eva-ray: iteration {t}: no prompt of {len(prompts)} showed a reward spread over its "
                      f"{self.off.responses_per_prompt} responses: no preference pair, nothing to train; the policy "
                      "stays as it is")
            trained = {"updates": 0, "loss_first": None, "loss_last": None, "pairs_cut": 0}
        with staged_dir(store.policy_dir, create=False) as staging:
            gather([self.system.learner.call("save", str(staging))])
        self.system.sync_weights()
        rewards = np.asarray([r["reward"] for r in rows], dtype=float)
        figures = {"iteration": t, "prompts": len(prompts), "made": made, "pairs": len(pairs),
                   "pair_fraction": len(pairs) / len(prompts), "reward_mean": float(np.nanmean(rewards)),
                   "rewritten": sum(bool(p["rewritten"]) for p in pairs), **trained,
                   "responses_total": responses_on_disk(self.run_dir), "seconds": time.perf_counter() - start}
        if evaluator is not None:
            figures["eval"] = evaluator.evaluate()
        store.mark_done(figures)
        if store.train_state() is not None:  # a resumed run starts from this checkpoint now: older ones go
            for earlier in range(1, t):
                IterationStore(self.run_dir, earlier).drop_checkpoint()
        return figures


def shard_call(off: Any, iteration: int, kind: str, index: int) -> int:
    """The rollout workers' call number for shard ``index`` of ``kind`` in ``iteration``: distinct for every shard
    of the run (their seeds come from it, ``actors.rollout.call_seed``)."""
    per_kind = math.ceil(off.prompts_per_iteration / off.shard_prompts)
    return ((iteration * len(SHARD_KINDS) + SHARD_KINDS.index(kind)) * per_kind + index) + 1


def _grouped(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"train/loss": x}`` -> ``{"train": {"loss": x}}``, the logger's layout."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        group, _, name = key.partition("/")
        out.setdefault(group, {})[name] = value
    return out


def _resume_dir(cfg: Config, resume: str | Path) -> Path:
    run_dir = Path(resume)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / STATE_FILE).is_file():
        raise ConfigError(f"--resume {run_dir}: not an offline run directory (no config.yaml and {STATE_FILE})")
    import yaml

    changes = config_changes(yaml.safe_load(saved.read_text()), yaml.safe_load(to_yaml(cfg)))
    if changes:
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's own: {'; '.join(changes)}")
    finished = len(list((run_dir / "offline").glob("iter-*/done.json")))  # iterations finish in order
    if cfg.offline.iterations < finished:
        raise ConfigError(f"offline.iterations: {cfg.offline.iterations} is below the {finished} iterations "
                          f"{run_dir} has finished; raise it to go on, or leave it as it was")
    return run_dir


def run_offline(cfg: Config, *, inline: bool = False, echo: Callable[[str], None] = print,
                resume: str | Path | None = None) -> OfflineSummary:
    """Run offline eva for ``offline.iterations`` iterations (see the module docstring)."""
    cfg = with_world_defaults(with_resolved_models(cfg))
    recipe = resolve_recipe(cfg)  # the config check ran it already: a RecipeError here is a ConfigError too
    train, held_out, data_report = load_prompts(cfg)
    if resume is not None:
        run_dir = _resume_dir(cfg, resume)
        state = json.loads((run_dir / STATE_FILE).read_text())
        echo(f"eva-ray: resuming the offline run {run_dir}")
    else:
        run_dir = make_run_dir(cfg)
        state = {}
        echo(f"eva-ray: run directory {run_dir}")
    write_text(run_dir / "config.yaml", to_yaml(cfg))  # a resumed run may have raised offline.iterations
    echo(f"eva-ray: seed set {data_report}; {len(train)} for training, {len(held_out)} held out")
    echo(f"eva-ray: offline {cfg.offline.arm}, {cfg.solver.algorithm}: {cfg.offline.iterations} iterations of "
         f"{cfg.offline.prompts_per_iteration} prompts x {cfg.offline.responses_per_prompt} responses; lr "
         f"{recipe.lr:g} ({recipe.lr_schedule}), beta {recipe.beta:g}, {recipe.epochs} epoch(s), batch "
         f"{recipe.batch_size}, {recipe.optimizer}" + (f" (the loss's published {', '.join(recipe.from_loss)})"
                                                       if recipe.from_loss else ""))
    summary = OfflineSummary(**state["summary"]) if state else OfflineSummary(
        run_dir=str(run_dir), arm=cfg.offline.arm, loss=cfg.solver.algorithm)
    if state:
        summary.resumed += 1
        summary.run_dir = str(run_dir)  # the folder may have moved since
    learner_cfg = for_learner(cfg, recipe)
    logger = MetricsLogger(run_dir, project=cfg.logging.wandb_project, run_name=run_dir.name, config=to_dict(cfg),
                           mode_setting=cfg.logging.wandb_mode, jsonl=cfg.logging.jsonl,
                           resume_id=state.get("wandb_id"), resume_step=state.get("version"))
    if logger.resume_refused:
        echo(logger.resume_refused)
    set_call_timeout(cfg.run.call_timeout_s)
    reset_signals()
    previous_sigterm = stop_on_sigterm(cfg.run.sigterm_grace_s)
    system = None
    try:
        system = start_system(learner_cfg, train, run_dir, inline=inline, echo=echo)
        warning = space_warning(cfg, run_dir, model_params(cfg.model.path), len(train))
        if warning:
            echo(warning)
        stop_on_sigterm()  # again: ray.init installs a handler of its own
        restarts = Restarts(system, max_restarts=cfg.resources.max_restarts, echo=echo,
                            ready_timeout_s=cfg.run.call_timeout_s)
        stores = [IterationStore(run_dir, t) for t in range(1, cfg.offline.iterations + 1)]
        done = [store.iteration for store in stores if store.done()]
        summary.iterations = [stores[t - 1].done() for t in done]  # the disk is the record
        trained = [t for t in done if stores[t - 1].train_state() is not None]
        if trained:  # the policy the last finished iteration ended with, back on the learner and the workers
            version = gather([system.learner.call("load_checkpoint", str(stores[trained[-1] - 1].checkpoint_dir))])[0]
            system.learner_version = int(version)
            system.sync_weights()
            echo(f"eva-ray: iterations {', '.join(map(str, done))} are finished; iteration {trained[-1]}'s policy "
                 f"(version {version}) is back on the learner and the rollout workers")
        # Children of the iterations whose set was formed before this process: no later child may repeat one (an
        # iteration killed between its evolve step and its set evolves again, so its children do not count).
        earlier = [c.prompt_text for store in stores if store.has_prompts() for c in store.children()]
        if earlier:
            gather([system.creator.call("remember", earlier)])
        tokenizer = _world_tokenizer(cfg) or (_policy_tokenizer(cfg) if cfg.offline.rewrite else None)
        evaluator = None
        if held_out:
            evaluator = Evaluator(system, held_out, world=world_of(cfg), restarts=restarts,
                                  initial=state.get("eval_initial"), tokenizer=tokenizer if cfg.world.name else None)
        runner = OfflineRun(cfg, recipe, system, run_dir, train, restarts, logger, echo, tokenizer, summary)

        def save_state() -> None:
            write_json(run_dir / STATE_FILE, {"summary": dataclasses.asdict(summary), "wandb_id": logger.run_id,
                                              "version": system.learner_version,
                                              "eval_initial": evaluator.initial if evaluator else None},
                       indent=2, default=float)

        (run_dir / "offline").mkdir(exist_ok=True)
        if evaluator is not None and not summary.eval_start:
            summary.eval_start = evaluator.evaluate()
            logger.log(0, {"eval": summary.eval_start})
            if evaluator.by_level:
                echo(f"eva-ray: held-out accuracy before training {_levels(summary.eval_start)}")
        save_state()
        for t in range(1, cfg.offline.iterations + 1):
            if t in done:
                continue
            figures = runner.iteration(t, evaluator)
            summary.iterations.append(figures)
            summary.responses = figures["responses_total"]
            logger.log(system.learner_version, {"offline": _flat_numbers(figures)})
            save_state()
            echo(iteration_line(figures))
    except KeyboardInterrupt:
        summary.interrupted = True
        echo(f"eva-ray: interrupted; {KEPT}; resume with: {resume_command(str(run_dir))}")
    except Exception as exc:
        line = lost_line(exc, str(run_dir), None, kept=KEPT)
        if line is not None:  # the learner or creator died, or an actor hung: one line, as online
            raise ActorLost(line) from exc
        echo(f"eva-ray: the run stopped (below); {KEPT}; once the cause is fixed, resume with: "
             f"{resume_command(str(run_dir))}")
        raise
    finally:
        if system is not None:
            summary.placement = system.placement
            try:
                stats = gather([w.call("stats") for w in system.rollout.workers], timeout=60)
                summary.workers = {w.name: {k: v for k, v in st.items() if k in WORKER_STATS}
                                   for w, st in zip(system.rollout.workers, stats)}
            except Exception as exc:  # noqa: BLE001 - a figure for the summary; the run's data is on disk
                echo(f"eva-ray: could not read the rollout workers' counts ({type(exc).__name__}: {exc})")
            system.shutdown()
        summary.write(run_dir / "summary.json")
        logger.close(summary={"offline": dataclasses.asdict(summary)})
        restore_sigterm(previous_sigterm)
        set_call_timeout(None)
    for line in summary_lines(summary):
        echo(line)
    return summary


def summary_lines(summary: OfflineSummary) -> list[str]:
    """The run's end: what each iteration trained on and how the held-out figures moved."""
    lines = [f"eva-ray: offline {summary.arm} with {summary.loss}: {len(summary.iterations)} iteration(s), "
             f"{summary.responses} responses generated; outputs in {summary.run_dir}"]
    start = summary.eval_start
    if start and "accuracy" in start:
        lines.append(f"eva-ray: held-out accuracy before: {_levels(start)}")
    for f in summary.iterations:
        ev = f.get("eval") or {}
        lines.append(f"eva-ray:   iteration {f['iteration']}: {f['pairs']} pairs from {f['prompts']} prompts, "
                     f"{f['updates']} updates" + (f", accuracy {_levels(ev)}" if "accuracy" in ev else "")
                     + (f", win-rate vs start {ev['win_rate']:.3f}" if "win_rate" in ev else ""))
    if summary.interrupted:
        lines.append("eva-ray: the run was interrupted; finished iterations and shards are kept for --resume")
    return lines


def _policy_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path,
                                         trust_remote_code=cfg.model.trust_remote_code)


def _flat_numbers(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def iteration_line(f: dict[str, Any]) -> str:
    made = f["made"]
    how = ("seed prompts" if made["how"] == "seed" else
           f"{made['evolved']} evolved + {made['kept']} kept")
    loss = (f"loss {f['loss_first']:.4g} -> {f['loss_last']:.4g}" if f.get("loss_last") is not None
            else "no update left to run")
    parts = [f"eva-ray: iteration {f['iteration']} done: {f['prompts']} prompts ({how}), reward mean "
             f"{f['reward_mean']:.3f}, {f['pairs']} pairs, {f['updates']} updates, {loss}, {f['seconds']:.0f}s"]
    ev = f.get("eval")
    if ev:
        parts.append(f"held-out win-rate {ev['win_rate']:.3f}")
        if "accuracy" in ev:
            parts.append(f"accuracy {_levels(ev)}")
    return "; ".join(parts)
