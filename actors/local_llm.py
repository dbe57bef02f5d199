"""A local Hugging Face causal LM served as a real, in-process LiteLLM provider.

The creator evolves prompts through ``litellm.acompletion``. With no network (tests, CPU runs, air-gapped clusters)
the evolve LLM is a local model folder, and it is served *through* LiteLLM rather than beside it, so the creator's
code path (request building, exception mapping, response parsing) is the one that runs against a hosted model.

    from actors.local_llm import register_local_provider
    import litellm

    provider = register_local_provider("/models/smollm2", provider="local", name="smollm2")
    response = await litellm.acompletion(model="local/smollm2", max_tokens=64, temperature=0.7, timeout=30,
                                         messages=[{"role": "user", "content": "Rewrite: 2+2?"}])
    text = response.choices[0].message.content
    provider.stats()  # {"calls": 1, "completed": 1, "failed": 0, ..., "mean_latency_s": ...}

A config that names ``evolve.model: local/smollm2`` registers with ``register_for_model(cfg.evolve.model, paths)``,
where ``paths`` maps local model names to folders (or is the one folder); a hosted model string registers nothing.

LiteLLM facts this module relies on (litellm 1.110.2, read from its source and checked here):

- ``litellm.custom_provider_map`` is re-read on every call (``custom_llm_setup()`` runs in the ``@client`` wrapper and
  ``ProviderConfigManager.get_custom_llm_handler`` takes the *first* entry whose name matches), so registering is a
  list edit, and re-registering must replace the entry: a duplicate would be shadowed by the stale first one.
- The provider is per process: register it inside the process (Ray actor) that calls LiteLLM.
- The handler receives ``model`` without the ``"<provider>/"`` prefix, and ``optional_params`` holding only what the
  caller passed (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ...).
- LiteLLM does not enforce ``timeout=`` for a custom provider; it passes it on (600.0 s when the caller gives none).
  This provider enforces it and raises ``CustomLLMError(408)``, which LiteLLM maps to ``litellm.Timeout``.
- Exceptions are mapped by status code: 400 -> ``litellm.BadRequestError``, 404 -> ``litellm.NotFoundError``,
  408 -> ``litellm.Timeout``, 500 -> ``litellm.InternalServerError``; any other exception from a handler becomes
  ``litellm.APIConnectionError``. All are ``openai.APIError`` subclasses with a ``status_code``.
- ``num_retries=`` does not retry here: LiteLLM's retry path imports ``tenacity``, which is not installed, so the
  async call raises the first error and the sync one raises a bare ``Exception``. Retry in the caller.

Limits: one choice per call (``n=1``), no streaming (LiteLLM's default ``astreaming`` answers 500), and a batch runs
to the largest ``max_tokens`` among its rows (each row is still cut at its own), so mixing very different limits
in one burst makes the short ones wait for the long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Must precede the first `import litellm` in the process: without it LiteLLM fetches its model cost map from the
# network at import time (and hangs until that times out where there is no network). setdefault keeps an explicit
# choice made by whoever launched the process.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm.llms.custom_llm import CustomLLM, CustomLLMError  # noqa: E402
from litellm.types.utils import ModelResponse, Usage  # noqa: E402

__all__ = [
    "LocalHFProvider",
    "LocalLLMStats",
    "local_model_name",
    "register_for_model",
    "register_local_provider",
    "unregister_local_provider",
]

_STOP = object()  # queue sentinel that ends the worker thread

try:
    from transformers import StoppingCriteria
except ImportError:  # pragma: no cover - transformers is a dependency; keep import of this module cheap otherwise
    StoppingCriteria = object


class _StopWhenClosing(StoppingCriteria):
    """A generate stopping criterion that ends every row once the provider is closing."""

    def __init__(self, closing: threading.Event) -> None:
        self.closing = closing

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.closing.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class _Request:
    """One chat completion waiting for the generation thread."""

    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (hit max_tokens)


@dataclass
class LocalLLMStats:
    """Counters of one provider. Tests read them to prove a call really went through the provider."""

    calls: int = 0  # requests received (counted on entry, before any validation)
    completed: int = 0
    failed: int = 0  # every failure, whatever the cause; the three below split it
    timeouts: int = 0
    bad_requests: int = 0  # refused before generation (400 malformed, 404 another model's name)
    errors: int = 0  # model load or generation raised
    cancelled: int = 0  # the caller's task was cancelled while waiting (not a failure: nobody wanted the answer)
    prompt_tokens: int = 0  # over completed calls
    completion_tokens: int = 0
    total_latency_s: float = 0.0  # over completed calls, queueing included
    max_latency_s: float = 0.0
    batches: int = 0  # generate() invocations; with requests_batched, shows how much batching happened
    requests_batched: int = 0
    max_batch_seen: int = 0


class LocalHFProvider(CustomLLM):
    """Serves one local causal LM folder as a LiteLLM custom provider.

    One generation thread owns the model: ``torch`` generation on a single model is not safe to run from several
    threads at once, and a single owner serialises it without a lock around the event loop. Requests that arrive
    while it is busy (or within ``batch_wait_ms`` of the first) are generated together in one left-padded batch of
    at most ``max_batch``; ``max_batch=1`` is plain serialised generation. Callers in an event loop await a future,
    so the loop never blocks on generation.
    """

    def __init__(self, model_path: str, *, name: str | None = None, device: str | None = None,
                 dtype: str = "float32", max_batch: int = 8, batch_wait_ms: float = 5.0,
                 default_max_tokens: int = 256, seed: int | None = None, trust_remote_code: bool = False) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.model_path = str(model_path)
        self.name = name  # when set, a request for another model name is refused (404) instead of served
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.default_max_tokens = default_max_tokens
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.model: Any = None
        self.tokenizer: Any = None
        self._device = "cpu"
        self._eos_ids: set[int] = set()
        self._load_lock = threading.Lock()
        self._stats = LocalLLMStats()
        self._stats_lock = threading.Lock()  # counters are bumped from the loop thread and from sync callers
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        # Set by close(): a generate in progress stops at its next token, so the thread can end before the process
        # does (a thread still inside generate at interpreter exit aborts the process).
        self._closing = threading.Event()
        # Normally one thread generates. A close() whose join times out can leave the old thread finishing a
        # batch while a new request starts a new one; this lock keeps the model single-user even then.
        self._generate_lock = threading.Lock()

    # ---------------------------------------------------------------- settings and lifecycle

    def settings(self) -> dict[str, Any]:
        """What makes two providers interchangeable (used to make re-registration idempotent)."""
        return {"model_path": self.model_path, "name": self.name, "device": self.device, "dtype": self.dtype,
                "max_batch": self.max_batch, "batch_wait_s": self.batch_wait_s,
                "default_max_tokens": self.default_max_tokens, "seed": self.seed,
                "trust_remote_code": self.trust_remote_code}

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Load tokenizer and model (idempotent; the first request calls it when registration did not)."""
        with self._load_lock:
            if self.model is not None:
                return
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {self.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
            if tokenizer.chat_template is None:
                raise ValueError(f"{self.model_path}: the tokenizer has no chat template; the provider needs one "
                                 "to turn chat messages into a prompt")
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype,
                                                         trust_remote_code=self.trust_remote_code)
            model.to(device).eval()
            # The end of an assistant turn can be a different token from the tokenizer's eos (chat models often
            # list several in generation_config); stopping on any of them is what makes finish_reason "stop".
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            if tokenizer.eos_token_id is not None:
                eos_ids.add(tokenizer.eos_token_id)
            if not eos_ids:
                raise ValueError(f"{self.model_path}: neither the model nor the tokenizer names an eos token")
            if tokenizer.pad_token_id is None:  # batching needs a pad id; it is masked out, so any id will do
                tokenizer.pad_token = tokenizer.eos_token
            if self.seed is not None:  # torch's global generator: the provider owns its process's sampling
                torch.manual_seed(self.seed)
            self.tokenizer, self._eos_ids, self._device = tokenizer, eos_ids, device
            self.model = model  # set last: `loaded` must not report a half-built provider

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the generation thread (a later request starts it again). The model stays loaded."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._closing.set()
                self._queue.put(_STOP)
        if worker is not None:
            worker.join(timeout)
            self._closing.clear()

    def stats(self) -> dict[str, float]:
        """A snapshot of the counters, with the mean latency of completed calls."""
        with self._stats_lock:
            snap = dict(vars(self._stats))
        snap["mean_latency_s"] = snap["total_latency_s"] / snap["completed"] if snap["completed"] else 0.0
        return snap

    # ---------------------------------------------------------------- LiteLLM entry points

    def completion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                   model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                   logging_obj: Any, optional_params: dict, acompletion: Any = None, litellm_params: Any = None,
                   logger_fn: Any = None, headers: dict | None = None, timeout: Any = None,
                   client: Any = None) -> ModelResponse:
        start = time.perf_counter()
        self._count(calls=1)
        request = self._make_request(model, messages, optional_params)
        try:
            result = request.future.result(_seconds(timeout))
        except concurrent.futures.TimeoutError:
            raise self._timed_out(request, timeout) from None
        return self._respond(model_response, model, result, start)

    async def acompletion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                          model_response: ModelResponse, print_verbose: Callable, encoding: Any, api_key: Any,
                          logging_obj: Any, optional_params: dict, acompletion: Any = None,
                          litellm_params: Any = None, logger_fn: Any = None, headers: dict | None = None,
                          timeout: Any = None, client: Any = None) -> ModelResponse:
        start = time.perf_counter()
        self._count(calls=1)
        request = self._make_request(model, messages, optional_params)
        try:
            # wrap_future: the loop awaits the generation thread instead of running it, so it stays responsive.
            result = await asyncio.wait_for(asyncio.wrap_future(request.future), _seconds(timeout))
        except asyncio.TimeoutError:
            raise self._timed_out(request, timeout) from None
        except asyncio.CancelledError:
            request.future.cancel()  # a queued request is dropped rather than generated for nobody
            self._count(cancelled=1)
            raise
        return self._respond(model_response, model, result, start)

    # ---------------------------------------------------------------- request and response

    def _make_request(self, model: str, messages: list, optional_params: dict) -> _Request:
        """Validate a call and queue it; a bad call fails here with a 400/404 the caller can tell apart."""
        try:
            if self.name is not None and model != self.name:
                raise CustomLLMError(404, f"local provider serves {self.name!r}, not {model!r}")
            if not messages:
                raise CustomLLMError(400, "messages is empty")
            if optional_params.get("n") not in (None, 1):
                raise CustomLLMError(400, "the local provider returns one choice per call (n=1)")
            max_tokens = optional_params.get("max_tokens")
            if max_tokens is None:
                max_tokens = optional_params.get("max_completion_tokens")
            max_tokens = int(max_tokens) if max_tokens is not None else self.default_max_tokens
            if max_tokens < 1:
                raise CustomLLMError(400, f"max_tokens must be >= 1, got {max_tokens}")
            temperature = optional_params.get("temperature")
            temperature = 1.0 if temperature is None else float(temperature)
            top_p = optional_params.get("top_p")
            top_p = 1.0 if top_p is None else float(top_p)
            if temperature < 0 or not 0 < top_p <= 1:
                raise CustomLLMError(400, f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
            stop = optional_params.get("stop") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            request = _Request([_text_message(m) for m in messages], max_tokens, temperature, top_p, stop)
        except CustomLLMError:
            self._count(failed=1, bad_requests=1)
            raise
        except (TypeError, ValueError, KeyError) as e:  # malformed messages or parameters
            self._count(failed=1, bad_requests=1)
            raise CustomLLMError(400, f"bad request: {e}") from e
        self._ensure_worker()
        self._queue.put(request)
        return request

    def _timed_out(self, request: _Request, timeout: Any) -> CustomLLMError:
        # A queued request is dropped; one already generating finishes in the background and is discarded.
        request.future.cancel()
        self._count(failed=1, timeouts=1)
        return CustomLLMError(408, f"local generation did not finish within {_seconds(timeout)} s")

    def _respond(self, model_response: ModelResponse, model: str, result: _Result | BaseException,
                 start: float) -> ModelResponse:
        if isinstance(result, BaseException):  # the generation thread hands failures back as values
            self._count(failed=1, errors=1)
            raise CustomLLMError(500, f"local generation failed: {type(result).__name__}: {result}") from result
        latency = time.perf_counter() - start
        model_response.choices[0].message.content = result.text
        model_response.choices[0].finish_reason = result.finish_reason
        model_response.model = model
        model_response.created = int(time.time())
        # setattr, as LiteLLM's own handlers do: `usage` is not a declared field of ModelResponse.
        setattr(model_response, "usage", Usage(prompt_tokens=result.prompt_tokens,
                                              completion_tokens=result.completion_tokens,
                                              total_tokens=result.prompt_tokens + result.completion_tokens))
        with self._stats_lock:
            s = self._stats
            s.completed += 1
            s.prompt_tokens += result.prompt_tokens
            s.completion_tokens += result.completion_tokens
            s.total_latency_s += latency
            s.max_latency_s = max(s.max_latency_s, latency)
        return model_response

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                setattr(self._stats, key, getattr(self._stats, key) + value)

    # ---------------------------------------------------------------- the generation thread

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                # daemon: an actor or test that never calls close() must still be able to exit
                self._worker = threading.Thread(target=self._serve, name=f"local-llm:{self.name or 'model'}",
                                                daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            # set_running_or_notify_cancel drops requests whose caller already gave up (timed out) while queued.
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            # One generate call per sampling setting: greedy and sampled rows cannot share a GenerationConfig.
            groups: dict[tuple[float, float], list[_Request]] = {}
            for r in live:
                key = (0.0, 1.0) if r.temperature == 0 else (r.temperature, r.top_p)
                groups.setdefault(key, []).append(r)
            for group in groups.values():
                try:
                    results: Sequence[_Result | BaseException] = self._generate(group)
                except Exception as e:  # noqa: BLE001 - every request of the batch fails with the cause
                    results = [e] * len(group)
                for request, result in zip(group, results):
                    request.future.set_result(result)

    def _collect(self) -> list[_Request] | None:
        """Block for one request, then take whatever else arrives within the batching window, up to max_batch."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                # Requests that queued while the previous batch generated are taken at once; only an idle
                # provider waits out the window for company.
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                    if self.batch_wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            batch.append(item)
        return batch

    def _generate(self, group: list[_Request]) -> list[_Result]:
        """Generate one left-padded batch. Rows share a sampling setting; each keeps its own max_tokens."""
        import torch
        from transformers import GenerationConfig

        self.load()
        tok, model = self.tokenizer, self.model
        limit = getattr(model.config, "max_position_embeddings", None)
        max_new = max(r.max_tokens for r in group)
        prompts = []
        for r in group:
            text = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template already placed any bos
            if limit is not None and len(ids) + max_new > limit:
                ids = ids[-max(1, limit - max_new):]  # keep the end: the instruction sits in the last turn
            prompts.append(ids)
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        # Left padding: every row's last prompt token lines up, so generation appends to all rows at once.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self._device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device)
        r0 = group[0]
        greedy = r0.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=not greedy, pad_token_id=pad, eos_token_id=sorted(self._eos_ids),
            # temperature 0 means greedy; passing it to a sampler would divide by zero
            **({} if greedy else {"temperature": r0.temperature, "top_p": r0.top_p}),
        )
        with self._generate_lock, torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                 stopping_criteria=[_StopWhenClosing(self._closing)])
        with self._stats_lock:
            self._stats.batches += 1
            self._stats.requests_batched += len(group)
            self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(group))
        return [self._finish(r, len(p), out[i, width:].tolist()) for i, (r, p) in enumerate(zip(group, prompts))]

    def _finish(self, request: _Request, prompt_tokens: int, new_ids: list[int]) -> _Result:
        """Cut one row at its own end of turn or max_tokens (the batch ran to the longest), then at stop strings."""
        ids = new_ids[:request.max_tokens]
        end = next((i for i, t in enumerate(ids) if t in self._eos_ids), None)
        if end is not None:
            ids, finish, used = ids[:end], "stop", end + 1  # the end-of-turn token was generated, so it counts
        else:
            finish = "length" if len(ids) >= request.max_tokens else "stop"
            used = len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in request.stop if s) if i >= 0]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        return _Result(text, prompt_tokens, used, finish)


# -------------------------------------------------------------------- registration


def _seconds(timeout: Any) -> float | None:
    """LiteLLM hands the timeout over as a float, or an httpx.Timeout whose read timeout is the one that matters."""
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)):
        return float(timeout)
    read = getattr(timeout, "read", None)
    return float(read) if read is not None else None


def _text_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten OpenAI content parts to one string: chat templates of small local models expect plain text."""
    content = message["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    if not isinstance(content, str):
        raise TypeError(f"message content must be text, got {type(content).__name__}")
    return {"role": message["role"], "content": content}


def _check_provider_name(provider: str) -> None:
    from litellm.llms.openai_like.json_loader import JSONProviderRegistry
    from litellm.types.utils import LlmProvidersSet

    if not provider or "/" in provider:
        raise ValueError(f"provider name must be non-empty and contain no '/', got {provider!r}")
    # LiteLLM routes a built-in provider's models to the built-in and ignores the custom handler (it only logs a
    # warning), so a shadowing name would silently reach for the network.
    if provider in LlmProvidersSet or JSONProviderRegistry.exists(provider):
        raise ValueError(f"provider name {provider!r} is a built-in LiteLLM provider; choose another, e.g. 'local'")


def register_local_provider(model_path: str, *, provider: str = "local", name: str | None = None,
                            device: str | None = None, dtype: str = "float32", max_batch: int = 8,
                            batch_wait_ms: float = 5.0, default_max_tokens: int = 256, seed: int | None = None,
                            trust_remote_code: bool = False, load_now: bool = False,
                            quiet: bool = True) -> LocalHFProvider:
    """Serve ``model_path`` as ``f"{provider}/<name>"`` for LiteLLM calls made in this process.

    Re-registering ``provider`` replaces its entry (closing the old provider's thread) rather than adding a second
    one; registering it again with identical settings returns the provider already there, loaded model and
    counters included, so an actor may call this on every start without reloading. ``name``: when given, only
    ``f"{provider}/{name}"`` is served and another name gets ``litellm.NotFoundError``. ``load_now`` loads the model
    here instead of on the first call. ``quiet`` sets ``litellm.suppress_debug_info``, which otherwise prints a
    "Give Feedback" banner on every failed call: the creator counts failures, it does not need a banner each.
    """
    _check_provider_name(provider)
    candidate = LocalHFProvider(model_path, name=name, device=device, dtype=dtype, max_batch=max_batch,
                                batch_wait_ms=batch_wait_ms, default_max_tokens=default_max_tokens, seed=seed,
                                trust_remote_code=trust_remote_code)
    existing = [item for item in litellm.custom_provider_map if item["provider"] == provider]
    old = existing[0]["custom_handler"] if existing else None
    if isinstance(old, LocalHFProvider) and old.settings() == candidate.settings() and len(existing) == 1:
        handler = old
    else:
        handler = candidate
        for item in existing:
            if isinstance(item["custom_handler"], LocalHFProvider):
                item["custom_handler"].close()
        # Edit in place: other modules may hold a reference to the same list object.
        litellm.custom_provider_map[:] = [item for item in litellm.custom_provider_map
                                          if item["provider"] != provider]
        litellm.custom_provider_map.append({"provider": provider, "custom_handler": handler})
    # LiteLLM runs this on every call anyway; running it now lets get_llm_provider() see the name before any call.
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
    if quiet:
        litellm.suppress_debug_info = True
    if load_now:
        handler.load()
    return handler


def unregister_local_provider(provider: str = "local") -> bool:
    """Remove ``provider`` from LiteLLM's map and stop its thread; True if it was registered."""
    removed = [item for item in litellm.custom_provider_map if item["provider"] == provider]
    for item in removed:
        if isinstance(item["custom_handler"], LocalHFProvider):
            item["custom_handler"].close()
    litellm.custom_provider_map[:] = [item for item in litellm.custom_provider_map if item["provider"] != provider]
    return bool(removed)


def local_model_name(model: str, provider: str = "local") -> str | None:
    """``"local/smollm2"`` -> ``"smollm2"``; a model string of any other provider -> None."""
    prefix = f"{provider}/"
    if not model.startswith(prefix):
        return None
    name = model[len(prefix):]
    if not name:
        raise ValueError(f"model {model!r} names no local model after {prefix!r}")
    return name


def register_for_model(model: str, paths: Mapping[str, str] | str, *, provider: str = "local",
                       **kwargs: Any) -> LocalHFProvider | None:
    """Register the local provider a LiteLLM model string needs, if it needs one.

    ``paths`` maps local model names to folders (``{"smollm2": "/models/smollm2"}``), or is the one folder to serve
    under whatever name the string gives. Returns None for a hosted model (``gemini/...``): nothing to register.
    ``kwargs`` go to ``register_local_provider``.
    """
    name = local_model_name(model, provider)
    if name is None:
        return None
    if isinstance(paths, str):
        path = paths
    else:
        if name not in paths:
            known = ", ".join(sorted(paths)) or "none"
            raise ValueError(f"model {model!r}: no folder configured for local model {name!r} (known: {known})")
        path = paths[name]
    return register_local_provider(path, provider=provider, name=name, **kwargs)
