"""Reward actor: turns the solver's responses into one number each, from a model or a Python function.

The driver calls ``score(prompts, responses)`` with the n responses to every prompt and gets back an n-long list of
rewards per prompt, which feed both the learner (RLOO / OAIF) and the creator (informativeness). ``compare`` gives
the probability that one response beats another, for the win-rate of the current policy against the initial one.

    rm = RewardActor("model", model="runs/tiny/reward")
    result = rm.score(prompts, [[r.text for r in group] for group in rollouts])
    result.rewards[i][j]           # reward of the j-th response to prompts[i]; NaN where no valid reward exists

Backends:

- ``model``: a pointwise reward model, ``AutoModelForSequenceClassification`` with one output (ArmoRM, Skywork,
  ...). Its input is the tokenizer's chat template applied to the prompt's messages plus the response as an
  assistant turn, padded on the RIGHT (ArmoRM's remote code reads the score just before the first pad; transformers'
  own heads read the rightmost non-pad token, which agrees). A sequence longer than ``max_length`` loses tokens from
  the LEFT, i.e. from the prompt side (a leading BOS is kept): the reward has to judge the whole response, and the
  end of the prompt (the question being answered) survives longest. Truncations are counted.
- ``pairwise``: a preference model that reads a (prompt, response A, response B) triple, formatted with
  ``pair_template`` (default :data:`PAIR_TEMPLATE`) and scored by a one-logit sequence classifier whose logit says
  "A is better". A pairwise model gives no pointwise score, so the reward of each of n responses is its mean win
  probability against the other n - 1, each pair judged in both orders and averaged to cancel position bias:
  ``P(i beats j) = (sigmoid(l(i, j)) + 1 - sigmoid(l(j, i))) / 2``. The n rewards of a prompt then average exactly
  0.5; a single response (no opponent) gets 0.5, a tie. Cost: n (n - 1) forward passes per prompt.
- ``function``: ``"package.module:callable"``, called as ``fn(prompt: PromptRecord, response: str) -> float`` (for
  verifiable tasks: exact match, unit tests, a reasoning-gym verifier).

Invalid rewards never crash a run and never propagate: a NaN or +-inf from a model or function becomes NaN and is
counted in ``n_nonfinite``; a function that raises on one response gives NaN for that response and is counted by
exception type. The learner is expected to drop NaN-rewarded responses.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.legacy_remote_code import provide_legacy_names
from eva_ray.dtypes import COMPUTE_DTYPES, torch_dtypes
from eva_ray.records import PromptRecord

BACKENDS: tuple[str, ...] = ("model", "pairwise", "function")
DTYPES: dict[str, torch.dtype] = torch_dtypes(COMPUTE_DTYPES)
PAIR_TEMPLATE = "<|source|>{prompt}\n<|candidate1|>{response_a}\n<|candidate2|>{response_b}"
"""Default text of a pairwise judgement (the shape PairRM reads); fields ``{prompt}``, ``{response_a}``,
``{response_b}``. Chat prompts are flattened to ``role: content`` lines."""

TIE_TOLERANCE = 1e-6
"""``compare(..., hard=True)`` calls a win probability this close to 0.5 a tie."""

RewardFn = Callable[[PromptRecord, str], float]


@dataclass
class RewardResult:
    """Rewards for a batch, with the bookkeeping of what went wrong."""

    rewards: list[list[float]]
    """``rewards[i][j]``: reward of response j to prompt i; NaN where the reward was invalid."""
    n_nonfinite: int
    """Values the model or function returned as NaN or +-inf (each replaced by NaN)."""
    counts: dict[str, int] = field(default_factory=dict)
    """``scored`` (responses), ``valid`` (finite rewards), ``nonfinite``, ``raised`` (function exceptions) and
    ``truncated`` (model inputs cut to ``max_length``)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Function exceptions by type name."""
    error_examples: dict[str, str] = field(default_factory=dict)
    """The first message seen for each exception type, to debug a reward function from the logs."""


class _Tally:
    """Counts invalid values while one call is scored."""

    def __init__(self) -> None:
        self.nonfinite = 0
        self.truncated = 0
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def clean(self, value: float) -> float:
        """Replace NaN / +-inf by NaN, counting it."""
        if math.isfinite(value):
            return value
        self.nonfinite += 1
        return math.nan

    def raised(self, exc: BaseException) -> float:
        name = type(exc).__name__
        self.errors[name] += 1
        self.examples.setdefault(name, str(exc)[:200])
        return math.nan

    def result(self, rewards: list[list[float]]) -> RewardResult:
        flat = [r for row in rewards for r in row]
        counts = {"scored": len(flat), "valid": sum(math.isfinite(r) for r in flat), "nonfinite": self.nonfinite,
                  "raised": sum(self.errors.values()), "truncated": self.truncated}
        return RewardResult(rewards=rewards, n_nonfinite=self.nonfinite, counts=counts, errors=dict(self.errors),
                            error_examples=dict(self.examples))


def sigmoid(x: float) -> float:
    """Logistic function that neither overflows nor turns a NaN into a number."""
    if math.isnan(x):
        return math.nan
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _hard(p: float) -> float:
    """A win probability as a hard outcome: 1 win, 0.5 tie, 0 loss (NaN stays NaN).

    Within TIE_TOLERANCE of 0.5 is a tie: the same text scored in two rows of a batch can differ in the last bits,
    and that noise must not decide a win.
    """
    if math.isnan(p):
        return math.nan
    if abs(p - 0.5) <= TIE_TOLERANCE:
        return 0.5
    return 1.0 if p > 0.5 else 0.0


# ---------------------------------------------------------------------------------------------------- function


def load_function(path: str) -> RewardFn:
    """Import ``"package.module:callable"`` (the attribute may be dotted, ``module:Class.method``)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"reward function {path!r}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # the user's module failed while importing (SyntaxError, an exception at top level)
        raise ImportError(f"reward function {path!r}: importing module {module_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _as_float(value: Any) -> float:
    # float("0.5") would succeed: a function returning text is a bug to report, not a reward.
    if isinstance(value, (str, bytes)):
        raise TypeError(f"reward function returned {type(value).__name__} {value!r:.40}, not a number")
    return float(value)


class _FunctionScorer:
    def __init__(self, fn: RewardFn) -> None:
        self.fn = fn

    def pointwise(self, items: list[tuple[PromptRecord, str]], tally: _Tally) -> list[float]:
        out = []
        for prompt, response in items:
            try:
                value = _as_float(self.fn(prompt, response))
            except Exception as exc:  # one bad response must not cost the whole batch its rewards
                out.append(tally.raised(exc))
                continue
            out.append(tally.clean(value))
        return out


# ------------------------------------------------------------------------------------------------------ models


def is_causal_lm_only(config: Any) -> bool:
    """True when a checkpoint was saved as a causal LM only, so a sequence-classification load adds an untrained head."""
    architectures = getattr(config, "architectures", None) or []
    return bool(architectures) and all(a.endswith("ForCausalLM") for a in architectures)


class _Classifier:
    """A one-output sequence classifier that scores token-id rows in right-padded batches."""

    def __init__(self, path: str, *, trust_remote_code: bool, batch_size: int, max_length: int,
                 device: torch.device, dtype: torch.dtype, revision: str | None = None) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if trust_remote_code:
            # Remote code written for transformers 4.x (ArmoRM) imports documentation constants 5.x removed.
            provide_legacy_names()
        # revision pins the hub snapshot: weights, tokenizer and the remote code (None: the default branch).
        source = dict(trust_remote_code=trust_remote_code, revision=revision)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **source)
        config = AutoConfig.from_pretrained(path, **source)
        # A plain causal LM (the usual way to start a reward model) has no score head yet: transformers adds a fresh
        # one, which must have one output for a pointwise score. Its scores are random until it is trained.
        self.untrained_head = is_causal_lm_only(config)
        extra = {"num_labels": 1} if self.untrained_head else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, **source, **extra).to(device).eval()
        if self.untrained_head:
            print(f"reward: {path} is a causal LM without a score head; its new head is untrained, so its rewards "
                  "carry no meaning (fine for a smoke run, not for training)", flush=True)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = self._pad_id(path)

    def _pad_id(self, path: str) -> int:
        """The id we pad with, which must also be the id the model looks for.

        transformers' classification heads find the scored position by searching for ``config.pad_token_id`` and
        refuse batches without one; a tokenizer padding with a different id would make the head score a pad token.
        So the model's id wins, then the tokenizer's pad, then EOS (Llama-3 style tokenizers have no pad token).
        """
        text_config = self.model.config.get_text_config()
        for candidate in (text_config.pad_token_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                pad_id = int(candidate if not isinstance(candidate, (list, tuple)) else candidate[0])
                text_config.pad_token_id = pad_id
                self.model.config.pad_token_id = pad_id
                return pad_id
        raise ValueError(f"reward model at {path!r}: neither the model config nor the tokenizer defines a pad or "
                         "EOS token, so batches cannot be padded")

    def truncate(self, ids: list[int], tally: _Tally) -> list[int]:
        """Cut from the left (the prompt side), keeping a leading BOS, to at most ``max_length`` ids."""
        if len(ids) <= self.max_length:
            return ids
        tally.truncated += 1
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos and self.max_length > 1:
            return [bos] + ids[len(ids) - self.max_length + 1:]
        return ids[len(ids) - self.max_length:]

    def logits(self, rows: list[list[int]]) -> list[float]:
        """One raw logit per row. Rows are batched by length so little padding is computed."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = [math.nan] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, value in zip(chunk, self._forward([rows[i] for i in chunk])):
                out[i] = value
        return out

    def _forward(self, rows: list[list[int]]) -> list[float]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            output = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        # ArmoRM-style remote code exposes the preference score as .score next to per-objective outputs.
        scores = getattr(output, "score", None)
        scores = output.logits if scores is None else scores
        if scores.dim() == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.dim() != 1:
            raise ValueError(f"the reward model returns scores of shape {tuple(scores.shape)} for {len(rows)} "
                             "sequences; it needs one score per sequence (a num_labels=1 head)")
        return scores.float().cpu().tolist()


class _ModelScorer:
    """Pointwise reward model over the chat-formatted (prompt, response) pair."""

    def __init__(self, classifier: _Classifier) -> None:
        self.clf = classifier
        if not classifier.tokenizer.chat_template:
            raise ValueError("the reward model's tokenizer has no chat template; backend 'model' formats the "
                             "prompt and response with it")

    def encode(self, prompt: PromptRecord, response: str, tally: _Tally) -> list[int]:
        messages = prompt.as_messages() + [{"role": "assistant", "content": response}]
        text = self.clf.tokenizer.apply_chat_template(messages, tokenize=False)
        # The template writes its own BOS; the tokenizer must not add a second one.
        ids = self.clf.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.clf.truncate(ids, tally)

    def pointwise(self, items: list[tuple[PromptRecord, str]], tally: _Tally) -> list[float]:
        if not items:
            return []
        rows = [self.encode(p, r, tally) for p, r in items]
        return [tally.clean(v) for v in self.clf.logits(rows)]


def _plain_prompt(prompt: PromptRecord) -> str:
    if prompt.text is not None:
        return prompt.text
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt.as_messages())


class _PairwiseScorer:
    """Pairwise preference model: logit that response A beats response B."""

    def __init__(self, classifier: _Classifier, template: str) -> None:
        self.clf = classifier
        self.template = template
        try:
            template.format(prompt="", response_a="", response_b="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"pair_template {template!r} must use only the fields {{prompt}}, {{response_a}}, "
                             f"{{response_b}} ({type(exc).__name__}: {exc})") from exc

    def pair_logits(self, triples: list[tuple[PromptRecord, str, str]], tally: _Tally) -> list[float]:
        """Raw logits (non-finite ones already replaced by NaN and counted), one per (prompt, A, B)."""
        if not triples:
            return []
        rows = []
        for prompt, a, b in triples:
            text = self.template.format(prompt=_plain_prompt(prompt), response_a=a, response_b=b)
            rows.append(self.clf.truncate(self.clf.tokenizer(text)["input_ids"], tally))
        return [tally.clean(v) for v in self.clf.logits(rows)]

    def win_probs(self, triples: list[tuple[PromptRecord, str, str]], tally: _Tally) -> list[float]:
        """P(A beats B) per triple, judged in both orders: mean of sigmoid(l(A, B)) and 1 - sigmoid(l(B, A))."""
        swapped = [(p, b, a) for p, a, b in triples]
        logits = self.pair_logits(triples + swapped, tally)
        forward, backward = logits[:len(triples)], logits[len(triples):]
        return [_nanmean([sigmoid(f), 1.0 - sigmoid(b)]) for f, b in zip(forward, backward)]

    def rewards(self, prompts: Sequence[PromptRecord], responses: Sequence[Sequence[str]],
                tally: _Tally) -> list[list[float]]:
        """Each response's mean win probability against the other responses to the same prompt."""
        pairs = [(k, i, j) for k, group in enumerate(responses)
                 for i in range(len(group)) for j in range(i + 1, len(group))]
        probs = self.win_probs([(prompts[k], responses[k][i], responses[k][j]) for k, i, j in pairs], tally)
        wins: list[list[list[float]]] = [[[] for _ in group] for group in responses]
        for (k, i, j), p in zip(pairs, probs):
            wins[k][i].append(p)
            wins[k][j].append(1.0 - p)
        # A lone response has no opponent: it counts as a tie (0.5), which keeps every prompt's mean at 0.5.
        return [[_nanmean(w) if w else 0.5 for w in group] for group in wins]


# ------------------------------------------------------------------------------------------------------- actor


class RewardActor:
    """Scores responses with a reward model, a pairwise preference model or a Python function."""

    def __init__(self, backend: str, *, model: str | None = None, function: str | RewardFn | None = None,
                 trust_remote_code: bool = False, batch_size: int = 16, max_length: int = 2048,
                 device: str | None = None, dtype: str = "auto", pair_template: str = PAIR_TEMPLATE,
                 revision: str | None = None) -> None:
        _check_settings(backend, model, function, batch_size, max_length, dtype)
        self.backend = backend
        self._scorer: _FunctionScorer | _ModelScorer | _PairwiseScorer
        if backend == "function":
            self._scorer = _FunctionScorer(load_function(function) if isinstance(function, str) else function)
        else:
            resolved = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            # trust_remote_code only when the caller passed True: it runs the checkpoint's own Python code.
            classifier = _Classifier(model, trust_remote_code=trust_remote_code is True, batch_size=batch_size,
                                     max_length=max_length, device=resolved,
                                     dtype=DTYPES[resolve_dtype(dtype, resolved)], revision=revision)
            self._scorer = (_ModelScorer(classifier) if backend == "model"
                            else _PairwiseScorer(classifier, pair_template))
        self._totals: Counter[str] = Counter()

    def score(self, prompts: Sequence[PromptRecord], responses: Sequence[Sequence[str]]) -> RewardResult:
        """Rewards for ``responses[i]`` (any number of responses) to each ``prompts[i]``."""
        _check_batch(prompts, responses)
        tally = _Tally()
        if isinstance(self._scorer, _PairwiseScorer):
            rewards = self._scorer.rewards(prompts, responses, tally)
        else:
            items = [(prompt, r) for prompt, group in zip(prompts, responses) for r in group]
            flat = iter(self._scorer.pointwise(items, tally))
            rewards = [[next(flat) for _ in group] for group in responses]
        result = tally.result(rewards)
        self._totals.update(result.counts)
        return result

    def compare(self, prompts: Sequence[PromptRecord], responses_a: Sequence[str], responses_b: Sequence[str],
                *, hard: bool = False) -> list[float]:
        """Probability that ``responses_a[i]`` beats ``responses_b[i]`` (NaN when it cannot be judged).

        Pointwise backends use the Bradley-Terry probability ``sigmoid(r_a - r_b)``; the pairwise backend judges
        both orders and averages. ``hard=True`` turns each probability into 1 (A wins), 0.5 (tie) or 0 (B wins):
        the right view for a 0/1 verifier, whose equal rewards are ties and whose 1-vs-0 is a sure win, not 0.73.
        The mean over a set of prompts is the win-rate of A.
        """
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(f"compare: {len(prompts)} prompts but {len(responses_a)} responses A and "
                             f"{len(responses_b)} responses B")
        _check_batch(prompts, [[a, b] for a, b in zip(responses_a, responses_b)])
        tally = _Tally()
        if isinstance(self._scorer, _PairwiseScorer):
            probs = self._scorer.win_probs(list(zip(prompts, responses_a, responses_b)), tally)
        else:
            scores = self._scorer.pointwise(list(zip(prompts, responses_a)) + list(zip(prompts, responses_b)), tally)
            probs = [sigmoid(a - b) for a, b in zip(scores[:len(prompts)], scores[len(prompts):])]
        self._totals.update(tally.result([probs]).counts)
        return [_hard(p) for p in probs] if hard else probs

    def stats(self) -> dict[str, int]:
        """Running totals over every ``score`` and ``compare`` call (see ``RewardResult.counts``)."""
        return dict(self._totals)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on a GPU (how reward models are published and how the planner counts them), float32 on the
    CPU (where bf16 matmuls are slow and lose precision for nothing)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def _check_settings(backend: str, model: str | None, function: Any, batch_size: int, max_length: int,
                    dtype: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"reward backend {backend!r} is not one of {BACKENDS}")
    if backend == "function":
        if function is None:
            raise ValueError("reward backend 'function' needs function='package.module:callable'")
        if model is not None:
            raise ValueError("reward backend 'function' takes function=, not model=")
        if not isinstance(function, str) and not callable(function):
            raise TypeError(f"function must be an import path or a callable, got {type(function).__name__}")
    else:
        if not model:
            raise ValueError(f"reward backend {backend!r} needs model= (a folder or hub id)")
        if function is not None:
            raise ValueError(f"reward backend {backend!r} takes model=, not function=")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {('auto', *DTYPES)}")


def _check_batch(prompts: Sequence[PromptRecord], responses: Sequence[Sequence[str]]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    for i, (prompt, group) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, PromptRecord):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, not a PromptRecord")
        if isinstance(group, str) or not all(isinstance(r, str) for r in group):
            raise TypeError(f"responses[{i}] must be a list of strings (the responses to prompt {prompt.id!r})")
