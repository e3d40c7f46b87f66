"""The optimizer step every loop shares: under fp16 a gradient scaler's overflow is an expected,
skipped step; without a scaler a non-finite gradient stops training."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_core.config import SFTConfig
from rlhf_core.errors import TrainingError
from rlhf_core.training.optim import make_accelerator, optimizer_step


class ScalingAccelerator(SimpleNamespace):
    """What `optimizer_step` uses of an fp16 accelerate.Accelerator, with a real GradScaler."""

    def clip_grad_norm_(self, params, max_norm):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unscale_gradients(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer.optimizer)


def _setup(scaled: bool):
    from accelerate.optimizer import AcceleratedOptimizer

    make_accelerator(SFTConfig())  # accelerate's process state, which AcceleratedOptimizer reads
    w = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if scaled else None
    opt = AcceleratedOptimizer(base, device_placement=False, scaler=scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda s: 1.0)
    acc = ScalingAccelerator(scaler=scaler, optimizer=opt)
    return w, opt, sched, acc


def _backward(acc, w, grad):
    loss = (w * grad).sum()
    (acc.scaler.scale(loss) if acc.scaler is not None else loss).backward()
    return loss.detach()


def test_an_fp16_overflow_step_is_skipped_not_an_error():
    w, opt, sched, acc = _setup(scaled=True)
    loss = _backward(acc, w, torch.tensor([float("inf"), 1.0, 1.0]))
    norm = optimizer_step(acc, [w], opt, sched, 1.0, "sft", 1, loss.nan_to_num())
    assert not torch.isfinite(torch.tensor(norm))
    assert opt.step_was_skipped and torch.equal(w.detach(), torch.ones(3))
    assert acc.scaler.get_scale() == 2.0 ** 15  # the scaler backed off
    assert sched.last_epoch == 0  # the schedule waits for a real step
    loss = _backward(acc, w, torch.tensor([1.0, 2.0, 2.0]))  # the next finite step is taken, unscaled
    optimizer_step(acc, [w], opt, sched, 0.0, "sft", 2, loss)
    assert not opt.step_was_skipped and sched.last_epoch == 1
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 0.8, 0.8]))


def test_without_a_scaler_a_non_finite_gradient_stops_training():
    w, opt, sched, acc = _setup(scaled=False)
    loss = _backward(acc, w, torch.tensor([float("inf"), 1.0, 1.0]))
    with pytest.raises(TrainingError, match="sft: non-finite grad_norm at step 1"):
        optimizer_step(acc, [w], opt, sched, 1.0, "sft", 1, loss.nan_to_num())
