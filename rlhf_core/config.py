"""One frozen config dataclass per stage; `params.yaml` mirrors them group by group.

`from_dict` rejects unknown keys and wrong types, and each `__post_init__` rejects values out of
range, so a bad `params.yaml` fails before any work starts, naming the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rlhf_core.errors import ConfigError

T = TypeVar("T")


def _check(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(key, rule)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(key, f"must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build `cls` from a mapping: unknown keys raise, values are type-checked."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix):
            raise ConfigError(prefix + e.key, e.rule) from None
        raise


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --- model and tokenisation ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    """A local HF model directory or hub id; empty builds the tiny Llama below from scratch."""
    trust_remote_code: bool = False
    """Allow code shipped with a model to run. Off unless you trust the source."""
    allow_pickle: bool = False
    """Allow loading pickle (`.bin`/`.pt`) weights; by default only safetensors load."""
    dtype: str = "float32"
    """Dtype the weights are loaded and trained in (the master weights): 'float32' (default, even
    for a bf16 checkpoint), 'bfloat16' or 'float16'. Mixed precision is set per stage."""
    vocab_size: int = 512
    """Size of the byte-level BPE vocabulary trained on the corpus (tiny model only)."""
    hidden_size: int = 128
    """Width of the tiny model."""
    num_layers: int = 4
    """Transformer blocks of the tiny model."""
    num_heads: int = 4
    """Attention heads of the tiny model."""
    intermediate_size: int = 256
    """MLP width of the tiny model."""
    max_position_embeddings: int = 256
    """Context length of the tiny model."""

    def __post_init__(self):
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _check(getattr(self, k) > 0, k, "must be > 0")
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        _check(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes plus special tokens)")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 128
    """Longest SFT / preference sequence in tokens; must fit the model's context."""
    block_size: int = 64
    """PT block length: documents are joined with EOS and cut into blocks of this size."""
    max_prompt_length: int = 64
    """Prompts longer than this keep their last tokens (the question sits at the end)."""
    max_response_length: int = 64
    """Preference responses are cut to this many tokens before the prompt is shortened."""
    overlong: str = "truncate"
    """A record over its token limit: 'truncate' (keep what fits), 'drop' (skip it) — both counted
    in the manifest — or 'error' (stop the tokenize stage, naming the file and line)."""
    eval_fraction: float = 0.1
    """Share of each dataset held out for evaluation."""
    judge_fraction: float = 0.0
    """Share of preference records held out for the judge reward model (`preference/judge`, trained
    by the `judge` stage, seen by no policy or policy RM); needed by `evaluate.judge: heldout_rm`."""
    seed: int = 0
    """Seed of the train/eval split."""
    max_dropped_fraction: float = 0.5
    """Tokenize fails when more than this share of a kind's records (sft, preference, prompts) was
    dropped (no trainable token left, or over its limit with `overlong: drop`)."""
    min_prompt_tokens: int = 4
    """Tokenize fails when truncation leaves a prompt (preference or PPO) shorter than this many tokens
    (or than `max_prompt_length`, if that is smaller)."""

    def __post_init__(self):
        _check(0.0 <= self.max_dropped_fraction <= 1.0, "max_dropped_fraction", "must be in [0, 1]")
        _check(self.min_prompt_tokens > 0, "min_prompt_tokens", "must be > 0")
        for k in ("max_length", "block_size", "max_prompt_length", "max_response_length"):
            _check(getattr(self, k) > 0, k, "must be > 0")
        _check(self.overlong in ("truncate", "drop", "error"), "overlong", "must be truncate, drop or error")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        _check(0.0 <= self.judge_fraction < 1.0, "judge_fraction", "must be in [0, 1)")
        _check(self.eval_fraction + self.judge_fraction < 1.0, "judge_fraction", "eval_fraction + judge_fraction must be < 1")
        _check(self.max_prompt_length < self.max_length, "max_prompt_length", "must be < max_length")


# --- training --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Adapter scale numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that receive adapters."""
    merge: bool = False
    """Merge adapters into the base weights when saving the final model."""

    def __post_init__(self):
        _check(self.r > 0, "r", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Fields every training stage shares."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    learning_rate: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 16
    """Micro-batch size per device (process): N processes train on global batches of N x this."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps (the data is cycled through epochs as needed)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    lr_scheduler: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    save_every: int = 50
    """Write a resumable checkpoint every this many steps; 0 disables it."""
    eval_every: int = 50
    """Evaluate on the held-out split every this many steps; 0 only at the end."""
    log_every: int = 10
    """Report metrics every this many steps."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (use bf16 on GPU): every forward of the stage runs under autocast
    (training, reference, reward, value, held-out evaluation); fp16 adds a gradient scaler, whose
    skipped (inf) steps are expected. fp16 needs a GPU; on CPU accelerate runs it in fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, ~30% slower)."""
    compile: bool = False
    """torch.compile each decoder layer of the trained model but the last, for dynamic shapes
    (`modeling.compile_layers`): fused kernels and fewer launches, meant for GPU workers. The
    layers share one compiled graph (two under LoRA); the first step pays for it (about 17 s for
    SmolLM2 on 2 CPU cores), and new lengths do not recompile. On 2 CPU cores it measured no faster
    for SmolLM2. Not for PPO (its rollouts generate token by token)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters for this stage."""

    def __post_init__(self):
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for k in ("batch_size", "grad_accum", "max_steps"):
            _check(getattr(self, k) > 0, k, "must be > 0")
        for k in ("warmup_steps", "save_every", "eval_every", "log_every"):
            _check(getattr(self, k) >= 0, k, "must be >= 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        _check(self.lr_scheduler in ("cosine", "linear", "constant"), "lr_scheduler", "must be cosine, linear or constant")
        _check(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "must be no, bf16 or fp16")


@dataclass(frozen=True)
class PTConfig(TrainConfig):
    enabled: bool = True
    """False: no continued pretraining; `models/pt` then only points at `model.name_or_path`
    (fine-tuning a pretrained chat model usually starts at SFT)."""


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    padding_free: bool = False
    """Lay each micro-batch's chats end to end in one row instead of padding them to the longest
    (no FLOPs on padding; the same loss and gradients up to float rounding). Needs an attention
    implementation that honours per-row position ids without a mask (transformers' sdpa, eager
    and flash-attention do); held-out evaluation stays padded."""


@dataclass(frozen=True)
class RMConfig(TrainConfig):
    padding_free: bool = False
    """As `sft.padding_free`, for the pairs: a micro-batch's chosen and rejected rows end to end in
    one row, each reward read at its row's last token."""
    share_prompt: bool = False
    """Put each pair's prompt through the model once: the rejected response continues the prompt
    beside the chosen one, under a custom attention mask that hides the chosen tokens from it
    (`SharedPromptPairBatch`). The same rewards and gradients up to float rounding, with the
    prompt's tokens computed once instead of twice. With `padding_free` all pairs share one row,
    otherwise one right-padded row per pair. The (R, T, T) mask replaces the causal fast path and
    grows with the square of a row's length; held-out evaluation stays padded."""
    margin: float = 0.0
    """Required reward gap: loss = -logsigmoid(r_c - r_r - margin)."""
    center_coef: float = 0.0
    """Weight of mean((r_c + r_r)^2), which keeps rewards centred at zero."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.center_coef >= 0, "center_coef", "must be >= 0")


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference."""
    loss_type: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo'."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped (sigmoid only)."""
    rpo_alpha: float = 0.0
    """Weight of an NLL term on the chosen response (RPO); keeps a tiny model from collapsing."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training instead of at every step."""
    padding_free: bool = False
    """As `sft.padding_free`, for the pairs: a micro-batch's chosen and rejected rows end to end in
    one row, through the policy and the reference."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.beta > 0, "beta", "must be > 0")
        _check(self.loss_type in ("sigmoid", "ipo"), "loss_type", "must be sigmoid or ipo")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(self.rpo_alpha >= 0, "rpo_alpha", "must be >= 0")


@dataclass(frozen=True)
class PPOConfig(TrainConfig):
    rollout_batch_size: int = 32
    """Prompts per rollout and per device (one optimizer phase of ppo_epochs); N processes each
    roll out this many of their own."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    max_new_tokens: int = 24
    """Longest generated response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling (1 = off)."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: 'k1' (logp - logp_ref) or 'k3'."""
    kl_controller: str = "fixed"
    """'fixed' or 'adaptive' (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Adaptive controller's target KL per sequence."""
    kl_horizon: int = 10000
    """Adaptive controller's horizon."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    value_clip_eps: float = 0.2
    """Value clip around the rollout-time values."""
    critic_learning_rate: float = 1e-4
    """Learning rate of the critic (a separate parameter group, so no value-loss weight is needed)."""
    critic_lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters for the critic (its score head stays fully trainable)."""
    score_clip: float = 5.0
    """Reward-model scores are clipped to [-score_clip, score_clip]; 0 disables it."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never emits EOS."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch."""
    ptx_coef: float = 0.0
    """Weight of a language-model loss mixed into the actor loss (InstructGPT PPO-ptx)."""
    ptx_data: str = "pt"
    """Data of the PPO-ptx loss: 'pt' (the tokenized pretraining blocks, as in InstructGPT) or 'sft' (the SFT chats)."""
    padding_free: bool = False
    """As `sft.padding_free`, for the rollout: every forward after sampling (old log-probs,
    reference, values, reward, each update micro-batch) lays its rows end to end in one row, the
    prompts' left padding and the tokens after each response's EOS dropped, positions restarting."""
    sampling_logprobs: bool = False
    """Take the old log-probs of the rollout from the sampling pass itself (each drawn token's
    log-prob under the generation logits at `temperature`) instead of a second forward of the
    actor over the rollout. Without it they come from that forward, so the first update's ratio
    is 1 exactly; with it they differ from it by the KV-cached incremental forward's rounding
    (measured on SmolLM2: at most 2.8e-5 per token in fp32; under bf16 autocast a mean of 0.036,
    so leave it off there)."""

    def __post_init__(self):
        super().__post_init__()
        for k in ("rollout_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            _check(getattr(self, k) > 0, k, "must be > 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _check(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be k1 or k3")
        _check(self.kl_controller in ("fixed", "adaptive"), "kl_controller", "must be fixed or adaptive")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma must be in (0, 1], lam in [0, 1]")
        _check(self.clip_eps > 0 and self.value_clip_eps > 0, "clip_eps", "clip ranges must be > 0")
        _check(self.rollout_batch_size % self.batch_size == 0, "rollout_batch_size", "must be a multiple of batch_size")
        _check(self.batch_size * self.grad_accum <= self.rollout_batch_size, "rollout_batch_size",
               "must be >= batch_size * grad_accum (one PPO minibatch), or no update would run")
        _check(self.ptx_data in ("pt", "sft"), "ptx_data", "must be pt or sft")
        _check(self.critic_learning_rate > 0, "critic_learning_rate", "must be > 0")
        _check(not self.compile, "compile", "is not supported for PPO (its rollouts generate token by token, "
               "which would recompile the layers at every length); set it for SFT, RM or DPO")


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 4
    """Samples per held-out prompt at `temperature` (besides one greedy answer)."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation."""
    max_new_tokens: int = 24
    """Longest generated answer."""
    batch_size: int = 32
    """Prompts per generation batch."""
    promotion_margin: float = 0.05
    """The best of PPO and DPO becomes `champion` only if its judge score beats SFT by this."""
    mixed_precision: str = "no"
    """'no' or 'bf16': every forward of the evaluation (generation, judge, reward, KL, preference
    accuracy) runs under bf16 autocast, as the training loops do."""
    judge: str = "auto"
    """Who scores the answers: 'oracle' (the demo task's rule-based judge; refused on other data),
    'heldout_rm' (a reward model trained by the `judge` stage on `preference/judge`, which no policy
    nor the policy RM saw), a directory or `models:/` URI of any sequence-classification model, or
    'auto': the oracle on the demo data, heldout_rm otherwise."""
    seed: int = 0
    """Seed of the sampling."""

    def __post_init__(self):
        _check(self.mixed_precision in ("no", "bf16"), "mixed_precision", "must be no or bf16")
        _check(self.num_samples > 0, "num_samples", "must be > 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
