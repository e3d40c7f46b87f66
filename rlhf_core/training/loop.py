"""Pieces every training loop shares: the result record, the optimizer step, progress and
fingerprints. The loops themselves live in their stage modules, one explicit loop each."""
from __future__ import annotations

import hashlib
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf_core.config import TrainConfig
from rlhf_core.errors import RLHFError
from rlhf_core.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_core.training.modeling import enable_gradient_checkpointing
from rlhf_core.training.optim import check_finite, make_accelerator, make_optimizer, make_scheduler

LogFn = Callable[[dict, int], None]
"""Tracking callback: `log(metrics, step)`. The library never imports a tracker itself."""


def no_log(metrics: dict, step: int) -> None:
    pass


class Stopped(RLHFError):
    """A stop was requested (SIGTERM): the loop wrote a checkpoint of its last step and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


_stop_signal: int | None = None


def request_stop(signum: int | None) -> None:
    """Ask the running loop to stop after its current step (None withdraws the request). The CLI
    calls this from its SIGTERM handler, so a preempted worker keeps all the steps it finished."""
    global _stop_signal
    _stop_signal = signum


def end_of_step(stage: str, cfg: TrainConfig, done: int, ckpt_dir: Path, fp: str, state: dict,
                extra: dict | None = None) -> None:
    """Checkpoint every `save_every` steps, and at once when a stop was requested (then raise Stopped)."""
    stop = _stop_signal is not None and done < cfg.max_steps
    if stop or (cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps):
        save_checkpoint(ckpt_dir, fp, done, **state, extra=extra)
    if stop:
        name = signal.Signals(_stop_signal).name
        raise Stopped(f"{stage}: stopped by {name} after step {done}; its checkpoint is in {ckpt_dir}; "
                      "run the same command again to resume from it", _stop_signal)


@dataclass
class StageResult:
    stage: str
    steps: int
    metrics: dict = field(default_factory=dict)
    """Final train metrics and held-out eval metrics (`eval/...`)."""
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fingerprint(config: dict, *inputs: str | Path) -> str:
    """Hash of a stage's config and its input files (name, size and first MiB of each)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for root in inputs:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(f"{f.relative_to(root.parent)}:{f.stat().st_size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class Prepared:
    """One trainable model with its optimizer and scheduler, placed by accelerate and restored
    from the stage's last checkpoint when one matches."""
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    state: dict
    """What `save_checkpoint` / `load_checkpoint` take."""
    start: int
    """First step to run: 0, or the step of the checkpoint resumed from."""


def prepare(model, cfg: TrainConfig, ckpt_dir: Path, fp: str) -> Prepared:
    acc = make_accelerator(cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    opt = make_optimizer(model.parameters(), cfg.learning_rate, cfg.weight_decay)
    sched = make_scheduler(opt, cfg)
    model, opt = acc.prepare(model, opt)
    state = {"models": {"model": acc.unwrap_model(model)}, "optimizers": {"opt": opt}, "schedulers": {"sched": sched}}
    resumed = load_checkpoint(ckpt_dir, fp, **state)
    params = [p for p in model.parameters() if p.requires_grad]
    return Prepared(acc, model, opt, sched, params, state, resumed[0] if resumed else 0)


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


class Throughput:
    """Counts tokens since start for tokens/s."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.tokens += int(n)
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def progress(stage: str, total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=stage, mininterval=2.0, dynamic_ncols=True)


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
