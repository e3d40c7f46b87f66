"""Build, load and save models: the tiny default Llama, real HF checkpoints, LoRA, value heads.

Loading is safe by default: only safetensors weights load unless `allow_pickle` is set, and
`trust_remote_code` stays off unless set.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf_core.atomic import atomic_dir
from rlhf_core.config import LoraConfig, ModelConfig
from rlhf_core.errors import ConfigError, ModelLoadError, TrainingError
from rlhf_core.ops.logprobs import last_token_index

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def import_model_code_without_scipy() -> None:
    """Lever (memory): import transformers' model code (`transformers.modeling_utils`) as it would
    be imported without scipy installed, which transformers supports. With scipy present it loads
    `scipy.optimize` for the Hungarian matching of its object-detection losses, which no stage
    uses: 40 MB more resident in every stage process (23 MB anonymous, 16 MB of library pages,
    measured after `import torch`; the tiny PPO bench row's peak 526 against 495 MB). Only the
    modules imported here take scipy as absent; transformers answers `is_scipy_available()` as
    before afterwards, and a process that imports scipy for itself still has it. Nothing happens
    where the model code was imported already. Called once, when this module is imported."""
    if "transformers.modeling_utils" in sys.modules:
        return
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    saved = import_utils.is_scipy_available, utils.is_scipy_available
    import_utils.is_scipy_available = utils.is_scipy_available = lambda: False
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        import_utils.is_scipy_available, utils.is_scipy_available = saved


import_model_code_without_scipy()


def build_tiny_causal_lm(cfg: ModelConfig, tokenizer, seed: int = 0):
    """A small Llama from `cfg`, seeded so the same config always gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return use_packed_sdpa(LlamaForCausalLM(config))


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def check_weights(path: str | Path, allow_pickle: bool) -> None:
    """Refuse a local model directory that is missing or holds only pickle weights."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    has_safe = any(p.glob("*.safetensors")) or (p / "adapter_model.safetensors").exists()
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and "training" not in f.name)
    if not has_safe and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path}: holds only pickle weights ({', '.join(pickles)}), which can run arbitrary code "
            "when loaded; convert them to safetensors or set model.allow_pickle: true if you trust them")
    if not has_safe and not pickles:
        raise ModelLoadError(f"{path}: no model weights found (expected *.safetensors)")
    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupted safetensors file before transformers reads it: the header
    must parse and every tensor's byte range must lie inside the file."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable safetensors weights ({e}); the file is corrupted or not "
                             "safetensors [weights]") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated safetensors weights ({size} bytes, the header needs "
                             f"{8 + n + end}); copy or download it again [weights]")


def _from_pretrained(auto_cls, path: str | Path, cfg: ModelConfig, **kwargs):
    path = str(path)
    if _is_local(path):
        check_weights(path, cfg.allow_pickle)
    try:
        # an explicit dtype: transformers' default ("auto") would train a bf16 checkpoint in pure bf16
        model = auto_cls.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, dtype=getattr(torch, cfg.dtype),
                                         use_safetensors=None if cfg.allow_pickle else True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    return use_packed_sdpa(model)


PACKED_SDPA = "sdpa_packed"


def use_packed_sdpa(model):
    """Lever: a model on transformers' SDPA attention switches to `PACKED_SDPA`, the same SDPA
    called row by row on rows laid end to end (`forward_packed_logits`, `token_scores` with
    positions), and plain SDPA everywhere else (padded batches, generation). Plain SDPA would
    attend over the whole (N, N) block-diagonal mask of the packed rows, most of it masked out, on
    the math kernel; row by row each attends only to itself, causally, on the flash kernel (on a
    GPU in half precision all rows in one varlen flash-attention call, `varlen_kernel`). Other
    attention implementations (eager, flash-attention, which packs by itself) are left as they are.
    The saved config keeps no trace of it. Returns `model`."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return model
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)  # a dict entry: registering again is harmless
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return model


def _packed_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """`PACKED_SDPA`'s attention: (1, H, N, D) rows end to end with their `cu_seq_lens_q` (as
    `packed_rows` gives them) attend row by row, causally: in one varlen flash-attention call where
    `varlen_kernel` says the device has one (`varlen_rows`), else one SDPA call per row, under the
    layer's sliding window where it has one and the row is longer (`_sliding_causal`). Anything
    else goes to plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    longest = kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kernel = varlen_kernel(query, kwargs)
    if kernel is not None and longest is not None:
        return varlen_rows(kernel, query, key, value, cu_seq_lens_q, longest, kwargs.get("scaling")), None
    lengths = _row_lengths(cu_seq_lens_q)
    kwargs["is_causal"] = True
    window = kwargs.get("sliding_window")
    outs = [sdpa_attention_forward(module, q, k, v, _sliding_causal(q.shape[2], window, q.device), **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, 1), None


def _sliding_causal(n: int, window: int | None, device) -> torch.Tensor | None:
    """The (1, 1, n, n) mask of a row of n tokens under a sliding window (a query sees the keys at
    most `window` - 1 before it, as transformers' sliding-window mask), or None where plain causal
    attention is the same (no window, or a row no longer than it)."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


def varlen_kernel(query: torch.Tensor, kwargs: dict):
    """torch's varlen flash attention (`torch.nn.attention.varlen.varlen_attn`, any of its
    signatures: `varlen_rows`) where it can take these rows: a CUDA device of compute capability
    8.0 or newer, attention in fp16/bf16 (half-precision queries, or bf16/fp16 autocast, under
    which the rotary product hands fp32 queries and keys to the attention function and SDPA would
    cast them), head dims up to 256 that are multiples of 8, no attention dropout and no sliding
    window. Else None, and the rows attend one SDPA call each. The varlen call replaces one kernel
    launch per row and layer (hundreds per layer at GPU batch sizes) with one; on the CPU there is
    no such kernel."""
    if not query.is_cuda or _half_dtype(query) is None:
        return None
    head_dim = query.shape[-1]
    if head_dim > 256 or head_dim % 8 or kwargs.get("dropout") or kwargs.get("sliding_window") is not None:
        return None
    if _capability(query.device.index) < (8, 0):
        return None
    return _torch_varlen_attn()


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The half precision attention runs in: the queries' own, or CUDA autocast's; None for fp32."""
    half = (torch.float16, torch.bfloat16)
    if query.dtype in half:
        return query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half:
        return torch.get_autocast_dtype("cuda")
    return None


@torch.compiler.assume_constant_result
def _capability(index: int | None) -> tuple[int, int]:
    """The device's compute capability. Under `compile: true` the attention runs inside a compiled
    layer: dynamo calls this once while tracing and keeps the result as a constant, rather than
    tracing into `torch.cuda` (which it would put in the graph as an op, or break the graph at)."""
    return _device_capability(index)


@functools.lru_cache(maxsize=None)
def _device_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=1)
def _torch_varlen_attn():
    """torch's `varlen_attn`, or None before torch had it (looked up once: every layer asks)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if {"window_size", "is_causal"} & kernel_arguments(varlen_attn) else None


@functools.lru_cache(maxsize=8)
def kernel_arguments(kernel) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(kernel).parameters)


def varlen_rows(kernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                longest: int, scaling: float | None) -> torch.Tensor:
    """Rows end to end, (1, H, N, D) queries and (1, H_kv, N, D) keys and values, attending causally
    each within its row (`cu_seq_lens`: int32 offsets, `longest`: the longest row) in one call of
    `kernel`, which takes (N, H, D) tensors as torch's `varlen_attn` does. Returns (1, N, H, D), the
    layout transformers' attention functions return, in the precision the attention ran in.

    torch's signature has changed from release to release: 2.12 and later take `scale`,
    `window_size` and `enable_gqa`; before, `window_size` and `scale` without `enable_gqa`; the
    first, `is_causal` only. What a kernel lacks is done around it: the key-value heads repeated
    for each query head they serve (as transformers' `repeat_kv`), the queries multiplied so that
    the default 1/sqrt(D) gives `scaling`."""
    dtype = _half_dtype(query) or query.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))
    takes = kernel_arguments(kernel)
    kw = {"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True}
    if "enable_gqa" in takes:
        kw["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "scale" in takes:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:
        q = q * (scaling * q.shape[-1] ** 0.5)
    return kernel(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, **kw)[None]


_last_rows: list = [None, None]  # (cu_seq_lens, its row lengths): every layer of one forward passes the same tensor


def _row_lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    """Row lengths from cumulative offsets, read from the device once per forward, not per layer."""
    if _last_rows[0] is not cu_seq_lens:
        _last_rows[:] = [cu_seq_lens, cu_seq_lens.diff().tolist()]
    return _last_rows[1]


def row_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: True where a row laid end to end starts, i.e. wherever a position does not
    follow the one before it."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def packed_rows(position_ids: torch.Tensor) -> dict:
    """The row boundaries of (1, N) rows laid end to end, where positions restart: the
    `cu_seq_lens_*` / `max_length_*` arguments that transformers' attention takes for packed rows
    (flash-attention reads the same ones on a GPU); the rows start where `row_starts` says."""
    idx = row_starts(position_ids)[0].nonzero().squeeze(-1)
    cu = torch.cat([idx, idx.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str | Path) -> str:
    """The base model of a saved LoRA adapter: a path relative to the adapter folder (as
    `save_model` writes it for bases inside the project) is resolved; a hub id or an absolute path
    is returned as written."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base:
        raise ModelLoadError(f"{path}: LoRA adapter names no base model (base_model_name_or_path)")
    if not os.path.isabs(base) and (Path(path) / base).is_dir():
        return os.path.normpath(Path(path) / base)
    return base


def _attach_adapter(base_model, path: str | Path, cfg: ModelConfig):
    """`base_model` wrapped with the (frozen) LoRA adapter saved in `path`."""
    from peft import PeftConfig, PeftModel

    check_weights(path, cfg.allow_pickle)
    try:
        config = PeftConfig.from_pretrained(str(path))
        if config.task_type == "CAUSAL_LM" and not hasattr(base_model, "prepare_inputs_for_generation"):
            config.task_type = None  # an SFT adapter under a reward model / critic: same module names, no generate
        return PeftModel.from_pretrained(base_model, str(path), config=config, is_trainable=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot load adapters ({str(e).splitlines()[0]})") from None


def _with_adapter(base_model, path: str | Path, cfg: ModelConfig):
    """`base_model` with the adapter saved in `path` merged in; it then answers to `path`, so LoRA
    trained on top of it records `path` (not the base under it) as its base."""
    model = _attach_adapter(base_model, path, cfg).merge_and_unload()
    model.name_or_path = model.config.name_or_path = str(path)
    return model


def load_causal_lm(path: str | Path, cfg: ModelConfig):
    """A causal LM from full weights, or from a LoRA adapter (merged into its base, recursively)."""
    from transformers import AutoModelForCausalLM

    if (Path(path) / ADAPTER_CONFIG).exists():
        return _with_adapter(load_causal_lm(adapter_base(path), cfg), path, cfg)
    model = _from_pretrained(AutoModelForCausalLM, path, cfg)
    check_causal(model, path)
    return model


@torch.no_grad()
def check_causal(model, where: str | Path) -> None:
    """Refuse a model whose outputs at a position depend on later tokens (an encoder such as BERT
    loaded as an LM): change the second half of a short input and the first half's logits must not
    move. A causal model gives identical logits (measured on CPU: 0.0 in fp32 and bf16); a
    random-init BERT moves them by ~2e-3 of their scale in fp32, a trained one by far more."""
    emb = model.get_input_embeddings()
    vocab, device = emb.num_embeddings, emb.weight.device
    ids = (torch.arange(8, device=device) * 37 + 3).remainder(vocab).unsqueeze(0)  # (1, 8)
    other = ids.clone()
    other[0, 4:] = (ids[0, 4:] * 5 + 11).remainder(vocab)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    a = forward_logits(model, ids, mask)[0, :4].float()  # (4, V)
    b = forward_logits(model, other, mask)[0, :4].float()
    model.train(was_training)
    eps = torch.finfo(emb.weight.dtype).eps if emb.weight.dtype.is_floating_point else 0.0
    tol = max(1e-4, 2 * eps) * max(1.0, float(a.abs().max()))  # half precision: room for GPU kernel noise
    if float((a - b).abs().max()) > tol:
        raise ModelLoadError(f"{where}: {type(model).__name__} ({model.config.model_type}) is not a causal language "
                             "model: its outputs at a position depend on later tokens, so it can be neither trained "
                             "nor sampled left to right; use a decoder-only model [causal]")


def load_scalar_model(path: str | Path, cfg: ModelConfig, pad_token_id: int):
    """A sequence classifier with one output: the reward model, or the critic's value head.

    From a causal-LM checkpoint the score head is new; from a reward model it is kept; from a
    LoRA reward model the adapters and its score head are merged into the base."""
    from transformers import AutoModelForSequenceClassification

    if (Path(path) / ADAPTER_CONFIG).exists():
        model = _with_adapter(load_scalar_model(adapter_base(path), cfg, pad_token_id), path, cfg)
    else:
        model = _from_pretrained(AutoModelForSequenceClassification, path, cfg, num_labels=1)
    if not hasattr(model, "score"):  # token_scores reads per-token values from a `score` head
        raise ModelLoadError(f"{path}: {type(model).__name__} has no per-token `score` head, so it cannot be "
                             "a reward model or critic here (use a decoder-only model) [causal]")
    model.config.pad_token_id = pad_token_id
    return model


def check_lora_targets(model, target_modules) -> None:
    """Every LoRA target must name a module of the model (peft matches by dotted suffix)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError("lora.target_modules", f"{', '.join(map(repr, missing))} names no module of "
                          f"{type(model).__name__} (its linear layers: {', '.join(linear)}) [lora_targets]")


def apply_lora(model, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_lora_targets(model, lora.target_modules)

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type=task_type)
    return get_peft_model(model, peft_cfg)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in backward (non-reentrant, so frozen inputs under
    LoRA still get gradients to the adapters)."""
    base = model.get_base_model() if is_peft(model) else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False


def compile_layers(model) -> int:
    """Lever (`compile: true`): `torch.compile` each decoder layer but the last, for dynamic shapes
    (regional compilation). The layers are instances of one class, so they share one compiled
    graph and the first step compiles it once, whatever the model's depth; batch and sequence
    lengths vary from step to step without recompiling. The last layer stays eager: `last_layer_at`
    swaps its `forward` during a call. The layers keep their parameters and names, so state dicts,
    checkpoints and saved models are unchanged. Call it before the accelerator wraps the model.
    Returns how many layers were compiled (0 for a model without `model.layers`)."""
    layers = decoder_layers(model)
    if not layers:
        return 0
    for layer in layers[:-1]:
        layer.compile(dynamic=True)
    return len(layers) - 1


def sparse_tied_embedding_grad(model, in_place: bool | None = None) -> bool:
    """Lever: when the input embedding is tied to the LM head and trained, its lookup's gradient
    never becomes a dense (V, d) tensor of its own (for SmolLM2, 49152 x 576 fp32: 113 MB, zeroed,
    scattered into and added to the head's every step).

    In one process the lookup's backward adds its rows in place into the weight's gradient, which
    the head's gradient has become by then (`_LookupGradInPlace`): no (V, d) tensor besides the
    gradient itself. Under DDP, whose hook reduces a gradient when autograd accumulates it, the
    lookup instead returns a sparse gradient (the batch's rows) that autograd adds into the head's
    dense one (out of place), and a post-accumulate hook densifies a gradient whose graph skipped
    the head. The weight's accumulated gradient is the same dense tensor either way (parity tests).
    Untied or frozen embeddings (scalar models, LoRA) are left as they are. Call it after the
    accelerator wraps the model: DDP decides which gradients are sparse when it is built.
    `in_place` picks a way (default: in place unless `model` is DDP). Returns whether it applied."""
    base = hf_model(model)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (not isinstance(emb, torch.nn.Embedding) or head is None or getattr(head, "weight", None) is not emb.weight
            or not emb.weight.requires_grad or emb.max_norm is not None or emb.scale_grad_by_freq):
        return False
    if in_place is None:
        in_place = not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    if not in_place:
        if not emb.sparse:
            emb.sparse = True
            emb.weight.register_post_accumulate_grad_hook(_densify_grad)
    elif not hasattr(emb, "_grad_token"):
        emb._grad_token = torch.zeros((), device=emb.weight.device, requires_grad=True)
        emb.forward = types.MethodType(_lookup_grad_in_place, emb)
    return True


def _densify_grad(p: torch.Tensor) -> None:
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


def _lookup_grad_in_place(emb: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """`emb`'s forward under `sparse_tied_embedding_grad` in one process."""
    if not (torch.is_grad_enabled() and emb.weight.requires_grad):
        return torch.nn.functional.embedding(ids, emb.weight, emb.padding_idx)
    return _LookupGradInPlace.apply(ids, emb._grad_token, emb)


class _LookupGradInPlace(torch.autograd.Function):
    """An embedding lookup with no autograd edge to the weight: its backward adds the output's
    gradient rows into `weight.grad` in place (the padding row excepted, as `nn.Embedding` does).
    Autograd accumulates a leaf's gradient as soon as its last producer is done, and the head's
    product is the first node of the backward pass, the lookup the last, so the head's gradient is
    `weight.grad` by then; a graph without the head starts from zeros. The 0-d `token` only makes
    the output require grad."""

    @staticmethod
    def forward(ctx, ids, token, emb):
        ctx.save_for_backward(ids)
        ctx.emb = emb
        return torch.nn.functional.embedding(ids, emb.weight.detach(), emb.padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        w = ctx.emb.weight
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        if ctx.emb.padding_idx is not None:
            keep = ids != ctx.emb.padding_idx
            ids, rows = ids[keep], rows[keep]
        with torch.no_grad():
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.index_add_(0, ids, rows)
        return None, None, None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what `generate` uses: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM logits (B, T, V) with padding-aware positions. `keep` projects only some positions
    onto the vocabulary (transformers' `logits_to_keep`): a (B, T) bool mask such as
    `ops.logprobs.scored_mask(labels)` gives (N, V) for its N True positions, a 1-D tensor of
    positions gives (B, K, V). The last layer then runs only at those positions (`last_layer_at`)."""
    positions = position_ids(attention_mask)
    with last_layer_at(model, keep, attention_mask, positions):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                     **_keep(keep, input_ids.device)).logits


def forward_packed_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM logits (1, N, V) of rows laid end to end (`PackedLMBatch`), attending within each
    row (`packed_inputs`). `keep` as in `forward_logits`."""
    with last_layer_at(model, keep, None, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **_keep(keep, input_ids.device),
                     **packed_inputs(model, input_ids, position_ids)).logits


def packed_inputs(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The forward's arguments for rows laid end to end: their bounds (`packed_rows`), by which
    `PACKED_SDPA` attends row by row, and for a model on `PACKED_SDPA` an all-ones attention mask.
    Given no mask, transformers finds the rows where the positions restart and builds their (N, N)
    block-diagonal mask at every forward, which `PACKED_SDPA` never reads: 14 ms for 3,392 tokens
    on 2 CPU cores, 1 s (484 MB) for the 22k tokens of SmolLM2's SFT at batch 256. Given one with
    no padding it takes the causal fast path and builds none. Other attention implementations get
    no mask: eager attends by the block-diagonal one, and flash-attention finds the rows in the
    positions only when there is no mask."""
    kw = packed_rows(position_ids)
    if getattr(getattr(hf_model(model), "config", None), "_attn_implementation", None) == PACKED_SDPA:
        kw["attention_mask"] = torch.ones_like(input_ids)
    return kw


HEAD_DEFERRABLE = ("LlamaForCausalLM", "Qwen2ForCausalLM")
"""Causal LMs whose forward returns the LM head's output as its logits, nothing applied after it
(no scaling or soft-capping), so that `head_deferred` may leave the head to the loss."""


@contextmanager
def head_deferred(model):
    """Lever: inside this block a causal LM's forward returns its final hidden states where its
    logits would be ((N, d) at `logits_to_keep`'s positions), and the block yields the head's
    weight (V, d) for the loss to apply itself, a chunk of positions at a time
    (`ops.losses.lm_head_loss`): no (N, V) logits or logit gradient are then ever whole. Yields
    None, and leaves the forward as it is, for a model not in `HEAD_DEFERRABLE` or a head that
    is not a plain bias-free `nn.Linear` (adapters on the head). The model's own forward still
    runs (a DDP wrapper's hooks included); only the head's `forward` is swapped while the block
    runs, and the head's weight gets its gradient through the loss."""
    base = hf_model(model)
    head = base.get_output_embeddings() if type(base).__name__ in HEAD_DEFERRABLE else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        yield None
        return
    head.forward = _identity
    try:
        yield head.weight
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _keep(keep: torch.Tensor | None, device) -> dict:
    """The model's `logits_to_keep` argument for `keep` (none: every position)."""
    return {} if keep is None else {"logits_to_keep": keep.to(device)}


TRIMMABLE_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
"""Decoder layers whose forward `last_layer_at` knows: pre-norm attention (q, k, v, o projections,
rotary positions from the model's module, no sliding window) and a pre-norm MLP, each added to
the residual."""


TRIM_AT_MOST = 0.75
"""`last_layer_at` runs the full layer when a row keeps more than this share of the positions:
the gathers and the masked attention then cost about what the skipped positions save (the tiny
model, 8 rows of 128: 3-10% slower keeping all but the last position, level at three quarters,
8-25% faster at a half and a quarter)."""


@contextmanager
def last_layer_at(model, keep: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  positions: torch.Tensor):
    """Lever: inside this block the model's last decoder layer runs only at the positions whose
    output is read (`keep`: a (B, T) bool mask, or a 1-D tensor of positions kept in every row).
    Its keys and values still come from every position, but its queries, attention, output
    projection and MLP only from the kept ones; every other position leaves the layer as zeros,
    which the final norm keeps at zero and nothing reads. The kept outputs are the full layer's (to
    float rounding), and so are all gradients, since no other position's last-layer output reaches
    a loss. The model's own forward still runs (a DDP wrapper's hooks included); only the layer's
    `forward` is swapped while the block runs.

    `attention_mask` is the forward's: (B, T) padding, (B, 1, T, T) bool as `SharedPromptPairBatch`
    gives, or None for rows laid end to end, whose `positions` restart at each row. Left as it
    is: nothing kept, a row keeping more than `TRIM_AT_MOST` of the positions, a layout where the
    kept queries' masked attention would cost more than the skipped positions save (`_trim_pays`:
    many rows end to end), a layer not in `TRIMMABLE_LAYERS`, gradient checkpointing (its
    recomputation would run after the block)."""
    layer = _last_layer(model)
    if keep is None or layer is None:
        yield
        return
    if keep.dtype != torch.bool:
        keep = torch.zeros(positions.shape, dtype=torch.bool, device=keep.device).index_fill_(1, keep, True)
    plan = _kept_queries(keep.to(positions.device), attention_mask, positions, _pairs_per_position(layer))
    if plan is None:
        yield
        return
    layer.forward = types.MethodType(lambda self, hidden_states, **kw: _last_layer_forward(self, hidden_states, plan, **kw),
                                     layer)
    try:
        yield
    finally:
        del layer.forward


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (`model.model.layers`), through any wrapper and
    LoRA; [] for a model without them."""
    return list(getattr(getattr(hf_model(model), "model", None), "layers", None) or [])


def _last_layer(model):
    """The last decoder layer of `model` when `last_layer_at` can run it at kept positions, else None."""
    layers = decoder_layers(model)
    if not layers:
        return None
    layer = layers[-1]
    attn = getattr(layer, "self_attn", None)
    if (type(layer).__name__ not in TRIMMABLE_LAYERS or getattr(layer, "gradient_checkpointing", False)
            or getattr(attn, "sliding_window", None) is not None):
        return None
    return layer


def _pairs_per_position(layer) -> float:
    """What the trimmed layer saves at each position it skips (the q and o projections and the
    gated MLP's three products) over what one query-key pair of its attention costs (QK^T and AV):
    (4 d h + 6 d f) / (4 h), with d the width, h the query heads' total width and f the MLP's.
    SmolLM2: 2880 pairs; the tiny model: 512."""
    q, gate = layer.self_attn.q_proj, layer.mlp.gate_proj
    d, h, f = q.in_features, q.out_features, gate.out_features
    return (4 * d * h + 6 * d * f) / (4 * h)


def _trim_pays(B: int, K: int, T: int, full_pairs: int, pairs_per_position: float) -> bool:
    """Whether the last layer at K kept queries per row (of B rows of T) costs less than the full
    layer. The kept queries attend over all T keys of their row of the layout under a mask, B K T
    query-key pairs, where the full layer's attention visits `full_pairs`; each of the B (T - K)
    skipped positions saves `pairs_per_position` pairs' worth of products. Padded rows pay up to
    long rows: keeping a half or less of each row adds no pairs, keeping `TRIM_AT_MOST` adds T
    per skipped position, against 2880 (SmolLM2) or 512 (the tiny model). Rows end to end stop
    paying once the layout is long, since the full layer attends within each row (one varlen call
    on a GPU) and the kept queries across the whole layout: SmolLM2's SFT at batch 256
    padding-free (about 22k tokens, half of them kept) would add 241M pairs to save products worth
    32M, while at batch 2 (about 180 tokens) it adds 8k pairs to save 259k."""
    return B * K * T - full_pairs < B * (T - K) * pairs_per_position


def _kept_queries(keep: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor,
                  pairs_per_position: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Where `keep` (B, T) is True, as (B, K) indices (rows with fewer than K kept repeat their
    first kept index; `valid` marks the real ones), and the (B, K, T) keys each kept query may see:
    those at or before it that the forward's mask lets it see (the same row, for rows end to end).
    A query that could see no key (a repeated index in a row of padding) sees itself, so no softmax
    row is empty. None where the full layer runs instead: nothing kept, a row keeping more than
    `TRIM_AT_MOST` of the positions, or where trimming would not pay (`_trim_pays`, with the
    layer's `pairs_per_position`)."""
    B, T = keep.shape
    counts = keep.sum(1)
    K = int(counts.max())
    if K == 0 or K > TRIM_AT_MOST * T:
        return None
    row = row_starts(positions).cumsum(1) if attention_mask is None else None  # rows end to end: 1, 2, ...
    if row is not None:  # the full layer attends within each row
        lengths = torch.bincount((row - 1 + T * torch.arange(B, device=row.device)[:, None]).flatten())
        full_pairs = int((lengths * (lengths + 1) // 2).sum())
    else:
        full_pairs = B * T * (T + 1) // 2
    if not _trim_pays(B, K, T, full_pairs, pairs_per_position):
        return None
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=keep.device) < counts[:, None]
    idx = torch.where(valid, idx, idx[:, :1])
    keys = torch.arange(T, device=keep.device)
    if attention_mask is not None and attention_mask.dim() == 4:
        seen = attention_mask[:, 0].to(torch.bool).gather(1, idx[..., None].expand(-1, -1, T))
    else:
        seen = keys <= idx[..., None]
        if attention_mask is not None:
            seen = seen & attention_mask.to(torch.bool)[:, None, :]
        else:  # rows end to end: only the query's own row
            seen = seen & (row[:, None, :] == row.gather(1, idx)[..., None])
    seen = seen | (~seen.any(-1, keepdim=True) & (keys == idx[..., None]))
    return idx, valid, seen


def _last_layer_forward(layer, hidden_states: torch.Tensor, plan, position_embeddings=None, **_) -> torch.Tensor:
    """A `TRIMMABLE_LAYERS` layer's forward at the kept positions of `plan` (`_kept_queries`):
    the layer's own modules, in its order; the other positions come out as zeros."""
    import torch.nn.functional as F

    idx, valid, seen = plan
    B, T, d = hidden_states.shape
    K = idx.shape[1]
    attn = layer.self_attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    h = layer.input_layernorm(hidden_states)
    key = attn.k_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
    rows = idx[..., None]
    query = attn.q_proj(h.gather(1, rows.expand(-1, -1, d))).view(B, K, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
    query, _ = rotary(query, query[:, :0], *(t.gather(1, rows.expand(-1, -1, t.shape[-1])) for t in (cos, sin)))
    _, key = rotary(key[:, :0], key, cos, sin)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=seen[:, None], scale=attn.scaling,
                                         dropout_p=attn.attention_dropout if layer.training else 0.0,
                                         enable_gqa=query.shape[1] != key.shape[1])
    out = attn.o_proj(out.transpose(1, 2).reshape(B, K, -1))
    out = hidden_states.gather(1, rows.expand(-1, -1, d)) + out
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    flat = (idx + T * torch.arange(B, device=idx.device)[:, None])[valid]
    return hidden_states.new_zeros(B * T, d).index_copy(0, flat, out[valid]).view(B, T, d)


def hf_model(model):
    """The transformers model inside any DDP/FSDP wrapper and LoRA."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if is_peft(inner) else inner


def score_head(model):
    """The `score` head of a sequence classifier, through any DDP/FSDP wrapper and LoRA."""
    return hf_model(model).score


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token outputs (B, T) of a one-label sequence classifier: values for the critic; the
    reward is the output at the last non-pad token. Rows laid end to end (`PackedPairBatch`) pass
    no mask and their restarting `positions`, as in `forward_packed_logits`. With `keep` (as in
    `forward_logits`) only the kept positions' outputs are computed (`last_layer_at`); the others
    are the head's output for a zero state, which nothing should read.

    The model's own forward runs (it pools one score per row, which is not used) and the score
    head's per-token output is read as it passes: calling the backbone and head directly would
    skip a DDP wrapper's forward, and DDP then silently leaves the gradients unsynchronised."""
    seen = []
    if attention_mask is not None:
        layout = {"attention_mask": attention_mask}
    else:  # rows end to end
        layout = packed_inputs(model, input_ids, positions)
    if positions is None:
        positions = position_ids(attention_mask)
    hook = score_head(model).register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with last_layer_at(model, keep, attention_mask, positions):
            model(input_ids=input_ids, position_ids=positions, use_cache=False, **layout)
    finally:
        hook.remove()
    return seen[-1].squeeze(-1).float()


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A one-label model's output at each row's last attended token (the reward): (B,), from one
    forward whose last layer runs only there (`token_scores` with `keep`). Left or right padding."""
    last = last_token_index(attention_mask)[:, None]
    keep = torch.zeros_like(attention_mask, dtype=torch.bool).scatter_(1, last, True)
    return token_scores(model, input_ids, attention_mask, keep=keep).gather(1, last).squeeze(1)


def portable_base(base: str, out_dir: str | Path) -> str:
    """How an adapter in `out_dir` names its base: relative to `out_dir` when the base is a folder
    inside the project (the working directory), so the project can move; else as given (a hub id,
    or a path outside the project that the user configured)."""
    if not os.path.isdir(base):
        return base
    base_abs, cwd = os.path.abspath(base), os.path.abspath(os.getcwd())
    if os.path.commonpath([base_abs, cwd]) != cwd:
        return base
    return os.path.relpath(base_abs, os.path.abspath(out_dir))


def save_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = False) -> None:
    """Save in HF format (safetensors) atomically; LoRA adapters are saved alone (with a portable
    reference to their base, see `portable_base`), or merged if asked."""
    base_saved = None
    if is_peft(model):
        base_saved = model.peft_config[model.active_adapter].base_model_name_or_path
        if merge_lora or not base_saved:  # adapters on an unsaved base would be orphaned: merge them
            model, base_saved = model.merge_and_unload(), None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if base_saved:
            conf = json.loads((tmp / ADAPTER_CONFIG).read_text())
            conf["base_model_name_or_path"] = portable_base(base_saved, out_dir)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True))
        verify_saved(tmp, out_dir, model)  # a broken save never replaces the previous good output


def verify_saved(path: Path, name: str | Path, model) -> None:
    """Post-condition of a saved model: config, safetensors weights and a tokenizer are there, and
    every tensor of the model that was saved is there with the model's shape."""
    path = Path(path)
    missing = [what for what, ok in (
        ("config.json or adapter_config.json", (path / "config.json").exists() or (path / "adapter_config.json").exists()),
        ("*.safetensors weights", any(path.glob("*.safetensors"))),
        ("tokenizer files", any(path.glob("tokenizer*"))),
    ) if not ok]
    if missing:
        raise TrainingError(f"{name}: saved model is incomplete (missing {', '.join(missing)})")
    from safetensors import safe_open

    if is_peft(model):
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
    else:
        expected = model.state_dict()
    saved = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            saved.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    for k, shape in saved.items():
        if k not in expected:
            raise TrainingError(f"{name}: saved weights hold tensor '{k}', which the model does not have [shape]")
        if shape != tuple(expected[k].shape):
            raise TrainingError(f"{name}: saved tensor '{k}' has shape {list(shape)}, the model's has "
                                f"{list(expected[k].shape)} [shape]")
    saved_storage = {expected[k].data_ptr() for k in saved}
    for k, t in expected.items():  # a tied weight (lm_head = embeddings) is saved once under one name
        if k not in saved and t.data_ptr() not in saved_storage:
            raise TrainingError(f"{name}: saved weights are missing tensor '{k}' [shape]")


def check_tokenizer_fits(model, tokenizer, where: str | Path) -> None:
    """Fail loudly when a tokenizer has ids the model has no embedding for."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise TrainingError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model embeds only {rows} "
                            "(tokenizer and model do not belong together)")


def load_policy(path: str | Path, cfg: ModelConfig):
    """A causal LM from a directory that holds either full weights or LoRA adapters (kept as a
    PEFT model over its base; a base that is itself an adapter folder is merged)."""
    if (Path(path) / ADAPTER_CONFIG).exists():
        return _attach_adapter(load_causal_lm(adapter_base(path), cfg), path, cfg)
    return load_causal_lm(path, cfg)
