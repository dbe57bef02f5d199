"""The chain_sum world: reasoning-gym's ``chain_sum`` arithmetic as a CPU proving ground for eva.

A task is a chain of additions and subtractions of non-negative integers (``57-87=``); its difficulty ``d`` is the
number of digits of every operand (1..5; a 1-digit operand is 0..9) and ``num_terms`` (default 2) is a second knob.
Tasks come from reasoning-gym's own generator (:class:`ChainSumDataset` with ``min_digits = max_digits = d`` and
``min_terms = max_terms = num_terms``) and are scored by its own verifier (``score_answer``). Only the prompt is
reduced: reasoning-gym asks ``State the final answer to the following arithmetic problem: 57 - 87 =``; the solver
sees the bare expression ``57-87=`` (short prompts keep a tiny model's steps cheap).

    from eva_ray.worlds import chain_sum
    D = chain_sum.seed_set(2000, {1: .2, 2: .2, 3: .2, 4: .2, 5: .2}, seed=0)   # PromptRecords, meta filled
    E = chain_sum.eval_set(400, seed=0)                                        # held out: disjoint from any D
    chain_sum.reward(D[0], "-30")                                              # score_answer: 1.0, 0.75, 0.0 ...
    chain_sum.exact_reward(D[0], "-300")                                       # 0.0: no credit for near misses

Held-out split. Every expression belongs to exactly one of two fixed partitions, chosen by a stable hash of its text
(:func:`is_held_out`, 20% held out). Seed sets, the solver's SFT data and curriculum children are drawn from the
training partition only; evaluation sets from the held-out one. So evaluation is disjoint from everything the solver
trains on, whatever seeds and sizes are used, and the creator can never evolve an evaluation prompt. The space is
small at d=1 with 2 terms (200 expressions, about 40 held out), so an evaluation set has at most that many there.

The answer lives in ``meta["answer"]`` (reasoning-gym's oracle string), but it is also recomputed from the
expression when ``meta`` is missing, so records read back without their meta still score correctly.

reasoning-gym is imported lazily (its package import takes seconds and pulls in matplotlib), so importing this module
is free; ``pip install reasoning-gym==0.1.25`` is needed once tasks are made or scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from eva_ray.records import PromptRecord
from eva_ray.worlds import base
from eva_ray.worlds.base import World, WorldParamError, register_world

WORLD = "chain_sum"
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_DIFFICULTY, MAX_DIFFICULTY = LEVELS[0], LEVELS[-1]
DEFAULT_NUM_TERMS = 2
MIN_TERMS, MAX_TERMS = 2, 12  # reasoning-gym's chain_sum curriculum spans 2..12 terms
HELD_OUT_FRACTION = 0.2
"""Share of the expression space (by a stable hash of the text) reserved for evaluation."""
DEFAULT_MIX: dict[int, float] = {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}
"""Seed-set level mix: with the shipped solver, L1 is always solved, L2/L3 sometimes, L4/L5 never."""
SFT_MIX: dict[int, float] = {1: 0.4, 2: 0.4, 3: 0.2}
"""The solver's pretraining mix (d=4, 5 never seen)."""

_EXPR_RE = re.compile(r"^\s*(\d+)((?:\s*[+-]\s*\d+)*)\s*=?\s*$")
_TERM_RE = re.compile(r"([+-])\s*(\d+)")
MORE_TERMS = "more_terms"
AT_MAX_TERMS = "at_max_terms"


# --- reasoning-gym ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _rg() -> tuple[Any, Any]:
    try:
        from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the chain_sum world needs reasoning-gym: pip install reasoning-gym==0.1.25") from exc
    return ChainSumConfig, ChainSumDataset


@lru_cache(maxsize=1)
def _score_answer():
    """reasoning-gym's verifier for chain_sum: ``score_answer(answer: str | None, entry: dict) -> float``."""
    _rg()
    from reasoning_gym.factory import get_score_answer_fn

    return get_score_answer_fn(WORLD)


def score_answer(response: str | None, answer: str) -> float:
    """reasoning-gym's own score of ``response`` against the oracle ``answer`` (1.0 exact; partial credit when the
    oracle is a substring of the response: ``len(oracle) / len(response)``; else 0.0)."""
    return float(_score_answer()(response, {"answer": str(answer)}))


# --- tasks --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One chain_sum item, reduced to the bare expression the solver sees."""

    text: str
    """The prompt: the expression without spaces, ending in ``=`` (``57-87=``)."""
    answer: str
    """reasoning-gym's oracle answer (``str(int)``)."""
    difficulty: int
    num_terms: int
    rg_seed: int
    """The reasoning-gym dataset seed that generated it (index 0): ``make_task(d, k, seed=rg_seed)`` rebuilds it."""

    def meta(self) -> dict[str, Any]:
        return {"world": WORLD, "answer": self.answer, "difficulty": self.difficulty, "num_terms": self.num_terms,
                "rg_seed": self.rg_seed}

    def record(self, record_id: str) -> PromptRecord:
        return PromptRecord(id=record_id, text=self.text, source="seed", meta=self.meta())


def _check_params(difficulty: int, num_terms: int) -> None:
    if not (isinstance(difficulty, (int, np.integer)) and difficulty >= 1):
        raise ValueError(f"difficulty (digits per operand) must be an integer >= 1, got {difficulty!r}")
    if not (isinstance(num_terms, (int, np.integer)) and num_terms >= 2):
        raise ValueError(f"num_terms must be an integer >= 2, got {num_terms!r}")


def make_task(difficulty: int, num_terms: int = DEFAULT_NUM_TERMS, *, seed: int) -> Task:
    """The reasoning-gym chain_sum item of dataset seed ``seed`` (index 0) at this difficulty; deterministic."""
    _check_params(difficulty, num_terms)
    config_cls, dataset_cls = _rg()
    config = config_cls(min_terms=num_terms, max_terms=num_terms, min_digits=difficulty, max_digits=difficulty,
                        allow_negation=False, seed=int(seed), size=1)
    item = dataset_cls(config)[0]
    text = item["metadata"]["expression"].replace(" ", "") + "="
    return Task(text=text, answer=item["answer"], difficulty=int(difficulty), num_terms=int(num_terms),
                rg_seed=int(seed))


def canonical(text: str) -> str:
    """The expression with all whitespace removed (the form hashed and compared)."""
    return "".join(text.split())


def is_held_out(text: str) -> bool:
    """Whether an expression belongs to the evaluation partition (a stable hash, the same in every process)."""
    return base.is_held_out(text, HELD_OUT_FRACTION)


def sample_task(difficulty: int, num_terms: int, rng: np.random.Generator, *, held_out: bool = False,
                max_draws: int = 1000) -> Task:
    """A random task of the training (default) or the held-out partition; reproducible from ``rng``."""
    knobs = {"difficulty": difficulty, "num_terms": num_terms}
    return ChainSumWorld().sample_task(knobs, rng, held_out=held_out, max_draws=max_draws)


def parse_expression(text: str) -> tuple[list[int], list[str]]:
    """Operands and operators of an expression such as ``57-87=`` or ``57 - 87 =``; ValueError when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"not a chain_sum expression: {text!r}")
    m = _EXPR_RE.match(text)
    if m is None:
        raise ValueError(f"not a chain_sum expression: {text[:80]!r}")
    terms = _TERM_RE.findall(m.group(2))
    return [int(m.group(1))] + [int(v) for _, v in terms], [op for op, _ in terms]


def evaluate_expression(text: str) -> int:
    operands, ops = parse_expression(text)
    total = operands[0]
    for op, value in zip(ops, operands[1:]):
        total = total + value if op == "+" else total - value
    return total


def infer_meta(text: str) -> dict[str, Any]:
    """The meta of a bare expression rebuilt from its text (difficulty = digits of the widest operand)."""
    operands, _ = parse_expression(text)
    return {"world": WORLD, "answer": str(evaluate_expression(text)),
            "difficulty": max(len(str(v)) for v in operands), "num_terms": len(operands)}


def task_params(record: PromptRecord) -> tuple[int, int]:
    """``(difficulty, num_terms)`` of a record: from its meta, else parsed from its text."""
    meta = record.meta or {}
    if isinstance(meta.get("difficulty"), int) and isinstance(meta.get("num_terms"), int):
        return meta["difficulty"], meta["num_terms"]
    inferred = infer_meta(record.prompt_text)
    return inferred["difficulty"], inferred["num_terms"]


# --- sets ---------------------------------------------------------------------------------------------------------
def seed_set(n: int, mix: Mapping[int, float] | None = None, seed: int = 0, *,
             num_terms: int = DEFAULT_NUM_TERMS) -> list[PromptRecord]:
    """The seed set D of :meth:`ChainSumWorld.seed_set` with ``num_terms`` terms per expression."""
    return ChainSumWorld({"num_terms": num_terms}).seed_set(n, mix, seed)


def eval_set(n_per_level: int, seed: int = 0, *, levels: Sequence[int] = LEVELS,
             num_terms: int = DEFAULT_NUM_TERMS) -> list[PromptRecord]:
    """Held-out tasks of :meth:`ChainSumWorld.eval_set` (about 40 exist at d=1 with 2 terms)."""
    return ChainSumWorld({"num_terms": num_terms}).eval_set(n_per_level, seed, levels=levels)


def write_jsonl(records: Sequence[PromptRecord], path: str | Path) -> Path:
    """Write records as ``{"id", "prompt", "meta"}`` rows (``data.prompt_field: prompt``, ``data.meta_field: meta``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"id": r.id, "prompt": r.prompt_text, "meta": r.meta}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[PromptRecord]:
    """Read what :func:`write_jsonl` wrote back into records (ids and meta kept)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            records.append(PromptRecord(id=str(row["id"]), text=row["prompt"], meta=dict(row.get("meta") or {})))
    return records


# --- reward -------------------------------------------------------------------------------------------------------
def answer_of(prompt: PromptRecord) -> str:
    """The oracle answer of a chain_sum prompt: ``meta["answer"]``, else computed from the expression."""
    meta = prompt.meta or {}
    if meta.get("answer") is not None:
        return str(meta["answer"])
    return str(evaluate_expression(prompt.prompt_text))


def reward(prompt: PromptRecord, response: str) -> float:
    """reasoning-gym's ``score_answer`` of ``response`` (whitespace stripped) for this prompt, in [0, 1].

    Any response (junk, empty, None, huge, not a string) scores, never raises: what is not the answer gets 0.0 (or
    reasoning-gym's partial credit when it contains the answer). Only a *prompt* that is not a chain_sum task
    (no ``meta["answer"]`` and no parsable expression) raises ValueError: that is a wiring error, and the reward
    actor counts it by type instead of training on a made-up 0.
    """
    answer = answer_of(prompt)
    if not isinstance(response, str):
        return 0.0
    try:
        value = score_answer(response.strip(), answer)
    except Exception:  # noqa: BLE001 - the verifier must never sink a batch
        return 0.0
    return value if np.isfinite(value) else 0.0


_INTEGER_RE = re.compile(r"^[+-]?\d+$")


def exact_reward(prompt: PromptRecord, response: str) -> float:
    """1.0 when ``response`` (whitespace stripped) is the answer as an integer, else 0.0 (``world.reward: exact``).

    The verifier's partial credit (0.75 for ``-300`` against ``-30``, 0.25 for text around the answer) gives a
    near miss a reward spread of its own, so RLOO pushes the policy towards answers that merely contain the right
    digits; here only a solve counts, the same event the held-out accuracy counts. Leading zeros and a ``+`` sign
    are accepted, as the verifier accepts them. Never raises for a response; a prompt that is not a chain_sum task
    raises ValueError, as in :func:`reward`.
    """
    want, got = _answer_parts(prompt), _integer_parts(response)
    return 1.0 if got == want else 0.0


def _answer_parts(prompt: PromptRecord) -> tuple[bool, str]:
    parts = _integer_parts(answer_of(prompt))
    if parts is None:
        raise ValueError(f"prompt {prompt.id!r}: its answer {answer_of(prompt)!r} is not an integer")
    return parts


def _integer_parts(text: Any) -> tuple[bool, str] | None:
    """``(negative, digits without leading zeros)`` of an integer written as text, else None. Compared as text:
    ``int()`` refuses more than 4,300 digits, and a response may hold any number."""
    if not isinstance(text, str) or not _INTEGER_RE.match(text.strip()):
        return None
    text = text.strip()
    digits = text.lstrip("+-").lstrip("0") or "0"
    return text.startswith("-") and digits != "0", digits


def digits_reward(prompt: PromptRecord, response: str) -> float:
    """The share of the answer's digits the response gets right, place by place from the units (``world.reward:
    digits``); 0.0 for a wrong sign or a response that is not an integer, 1.0 only for the exact answer.

    Why: the solver's misses are mostly one middle digit (``805`` for ``815``). Under a 0/1 reward RLOO then pushes
    down every token of the miss, the correct units digit after the wrong tens digit too; here that miss keeps 2/3
    of the credit, so the advantage falls on the digit that differs. A response with more digits than the answer
    is scored over its own length, so padding an answer with digits never pays. Never raises for a response.
    """
    want, got = _answer_parts(prompt), _integer_parts(response)
    if got is None or got[0] != want[0]:
        return 0.0
    a, b = want[1][::-1], got[1][::-1]
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


# --- evaluating a solver --------------------------------------------------------------------------------------------
def evaluate_solver(model: Any, tokenizer: Any, records: Sequence[PromptRecord], *, temperature: float = 0.0,
                    max_new_tokens: int = 12, batch_size: int = 512, seed: int = 0) -> dict[int, dict[str, float]]:
    """Accuracy (reward == 1) and mean reward of ``model`` by level, with the rollout worker's prompt format.

    The prompt is ``apply_chat_template([user turn], add_generation_prompt=True)`` tokenised without added special
    tokens, left-padded; the response is decoded with special tokens skipped, up to the first EOS. ``temperature``
    0 is greedy; otherwise sampling, seeded by ``seed``.
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    by_level: dict[int, list[tuple[float, float]]] = {}
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            rows = [tokenizer(tokenizer.apply_chat_template(r.as_messages(), add_generation_prompt=True,
                                                            tokenize=False), add_special_tokens=False)["input_ids"]
                    for r in chunk]
            responses = _generate(model, rows, pad, eos, temperature, max_new_tokens, seed + start)
            for r, ids in zip(chunk, responses):
                value = reward(r, tokenizer.decode(ids, skip_special_tokens=True))
                by_level.setdefault(task_params(r)[0], []).append((float(value == 1.0), value))
    finally:
        model.train(was_training)
    return {d: {"n": len(v), "accuracy": float(np.mean([a for a, _ in v])),
                "mean_reward": float(np.mean([x for _, x in v]))} for d, v in sorted(by_level.items())}


def _generate(model: Any, rows: list[list[int]], pad: int, eos: int, temperature: float, max_new_tokens: int,
              seed: int) -> list[list[int]]:
    """The rollout worker's HF path: left padding, ``generate`` (greedy, or temperature sampling with top_k off)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                  do_sample=bool(temperature and temperature > 0))
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(temperature), top_p=1.0, top_k=0)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].tolist()
    responses = []
    for row in out:
        cut = row.index(eos) + 1 if eos in row else len(row)
        responses.append(row[:cut])
    return responses


# --- the world ----------------------------------------------------------------------------------------------------
@register_world
class ChainSumWorld(World):
    """chain_sum behind the world interface. Knobs: ``difficulty`` (digits per operand) and ``num_terms``.

    ``world.params``: ``num_terms`` (terms in the seed and held-out sets, default 2) and ``max_terms`` (the cap of
    the ``more_terms`` move, default 12, reasoning-gym's curriculum range). Every level's skill unit is the level.
    """

    name = WORLD
    rewards = {"verifier": f"{__name__}:reward", "exact": f"{__name__}:exact_reward",
               "digits": f"{__name__}:digits_reward"}
    default_reward = "verifier"
    moves = (base.HARDER, base.SIBLING, base.EASIER, MORE_TERMS)
    default_model = "world:chain_sum_solver"
    held_out_fraction = HELD_OUT_FRACTION
    levels = LEVELS
    default_mix = DEFAULT_MIX
    param_defaults = {"num_terms": DEFAULT_NUM_TERMS, "max_terms": MAX_TERMS}

    def __init__(self, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(params, seed=seed)
        for key, low in (("num_terms", MIN_TERMS), ("max_terms", MIN_TERMS)):
            value = self.params[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorldParamError(f"world.params.{key}: {value!r}; allowed: an integer >= {low}")

    def _set_key(self) -> tuple[int, ...]:
        return (int(self.params["num_terms"]),)

    def base_knobs(self, difficulty: int) -> dict[str, int]:
        return {"difficulty": int(difficulty), "num_terms": int(self.params["num_terms"])}

    def draw_task(self, knobs: Mapping[str, int], rng: np.random.Generator) -> Task:
        return make_task(knobs["difficulty"], knobs.get("num_terms", self.params["num_terms"]),
                         seed=int(rng.integers(0, 2**48)))

    def knobs(self, record: PromptRecord) -> dict[str, int]:
        difficulty, num_terms = task_params(record)
        return {"difficulty": difficulty, "num_terms": num_terms}

    def answer(self, record: PromptRecord) -> str:
        return answer_of(record)

    def move(self, operator: str, knobs: Mapping[str, int], *, min_difficulty: int, max_difficulty: int
             ) -> tuple[dict[str, int], str | None]:
        if operator == MORE_TERMS:
            k = int(knobs["num_terms"])
            return {**knobs, "num_terms": k + 1}, AT_MAX_TERMS if k >= self.params["max_terms"] else None
        moved, why = super().move(operator, knobs, min_difficulty=min_difficulty, max_difficulty=max_difficulty)
        if operator == base.SIBLING:
            moved["num_terms"] = min(int(knobs["num_terms"]), int(self.params["max_terms"]))
        return moved, why


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m eva_ray.worlds.chain_sum --out-dir data/chain_sum``: write seed.jsonl and eval.jsonl."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--n-seed", type=int, default=2000)
    p.add_argument("--mix", default="1:0.2,2:0.2,3:0.2,4:0.2,5:0.2", help="level:weight,...")
    p.add_argument("--n-eval-per-level", type=int, default=400)
    p.add_argument("--num-terms", type=int, default=DEFAULT_NUM_TERMS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    mix = {int(k): float(v) for k, v in (part.split(":") for part in a.mix.split(","))}
    out = Path(a.out_dir)
    seeds = seed_set(a.n_seed, mix, a.seed, num_terms=a.num_terms)
    evals = eval_set(a.n_eval_per_level, a.seed, num_terms=a.num_terms)
    print(write_jsonl(seeds, out / "seed.jsonl"), len(seeds))
    print(write_jsonl(evals, out / "eval.jsonl"), len(evals))


if __name__ == "__main__":
    main()
