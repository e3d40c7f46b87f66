"""AdamW with warmup and a decay schedule, the optimizer step, seeding, and the accelerate set-up
every stage shares."""
from __future__ import annotations

import math
import random

import torch

from rlhf_core.config import TrainConfig
from rlhf_core.errors import TrainingError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.95) over the trainable parameters, as torch's fused kernel (all tensors in one
    pass) where every parameter sits on a CPU or CUDA device: the per-tensor loop's update up to
    float rounding, in a fraction of its time (SmolLM2-135M on 2 CPU cores: 130 ms per step
    against 540-860 ms; parity in test_lever_parity.py)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int | None = None):
    total = total_steps or cfg.max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.lr_scheduler))


def make_accelerator(cfg: TrainConfig):
    """The stage's accelerator. accelerate keeps one process-wide state that refuses a second
    precision, so it is reset: stages run one after another in one process (tests, notebooks)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


def check_finite(stage: str, step: int, **values: torch.Tensor) -> None:
    """Stop on a NaN/inf loss or gradient norm, naming the stage, step and quantity."""
    for name, v in values.items():
        if v is not None and not torch.isfinite(torch.as_tensor(v)).all():
            raise TrainingError(f"{stage}: non-finite {name} at step {step}; the last good checkpoint "
                                "is kept and nothing is registered (lower the learning rate?)")


def uses_grad_scaler(accelerator) -> bool:
    """fp16: gradients are scaled, and a step whose scaled gradients overflow is skipped."""
    return getattr(accelerator, "scaler", None) is not None


def optimizer_step(accelerator, params, optimizer, scheduler, max_grad_norm: float, stage: str,
                   step: int, loss: torch.Tensor) -> float:
    """Clip, check for non-finite values, step and zero the gradients; returns the grad norm.

    Under fp16 an inf/NaN gradient norm is the gradient scaler's expected overflow: the scaler
    skips that step (and the schedule waits) and lowers its scale, so only the loss is checked."""
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales fp16 gradients first
    else:
        accelerator.unscale_gradients()
        norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    scaled = uses_grad_scaler(accelerator)
    check_finite(stage, step, loss=loss, grad_norm=None if scaled else norm)
    optimizer.step()
    if not (scaled and getattr(optimizer, "step_was_skipped", False)):
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
