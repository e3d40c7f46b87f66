"""Models a stage uses but never trains: the DPO and PPO references, PPO's reward model, the
evaluation's policies and judges."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from rlhf_core.training.modeling import is_peft


def freeze(model, device):
    """`model` on `device`, in eval mode, with no parameter requiring a gradient."""
    return model.to(device).eval().requires_grad_(False)


class Frozen:
    """A frozen model, prepared once, whose every call runs without gradients, in eval mode and
    under the stage's autocast (so its numbers are in the precision the trained model uses).

    It is either a model of its own (frozen here), or, under LoRA, the trainable policy itself
    with its adapters disabled for the call: the same weights without a second copy."""

    def __init__(self, model, device=None, autocast: Callable = nullcontext, adapters_off: bool = False):
        self.adapters_off = adapters_off
        self.model = model if adapters_off else freeze(model, device)
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, fn: Callable, *args, **kwargs):
        """`fn(model, *args, **kwargs)` on the frozen model."""
        if not self.adapters_off:
            with self.autocast():
                return fn(self.model, *args, **kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast(), self.model.disable_adapter():
                return fn(self.model, *args, **kwargs)
        finally:
            self.model.train(was_training)


def reference(policy, load: Callable[[], torch.nn.Module], device, autocast: Callable = nullcontext) -> Frozen:
    """The reference of a policy in training: the policy without its adapters under LoRA, else a
    frozen copy of the model it started from (`load()`)."""
    if is_peft(policy):
        return Frozen(policy, autocast=autocast, adapters_off=True)
    return Frozen(load(), device, autocast)
