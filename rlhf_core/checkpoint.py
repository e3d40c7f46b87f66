"""Resumable training state: weights, optimizers, schedulers, RNG, step and stage extras.

A checkpoint is written to a temporary folder and renamed into place, and carries a fingerprint
of the config and inputs; a checkpoint whose fingerprint differs is ignored, so changing a
parameter never resumes a run that belongs to other settings.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from rlhf_core.atomic import atomic_dir


def save_checkpoint(ckpt_dir: Path, fingerprint: str, step: int, models: dict, optimizers: dict,
                    schedulers: dict, extra: dict | None = None) -> None:
    with atomic_dir(ckpt_dir) as tmp:
        for name, model in models.items():
            save_model(model, str(tmp / f"{name}.safetensors"))
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizers.pt")
        torch.save({k: s.state_dict() for k, s in schedulers.items()}, tmp / "schedulers.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"fingerprint": fingerprint, "step": step, "extra": extra or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(ckpt_dir: Path, fingerprint: str, models: dict, optimizers: dict,
                    schedulers: dict) -> tuple[int, dict] | None:
    """Restore everything in place and return (step, extra), or None if there is nothing to resume."""
    state_file = Path(ckpt_dir) / "trainer_state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if state["fingerprint"] != fingerprint:
        return None
    for name, model in models.items():
        load_model(model, str(ckpt_dir / f"{name}.safetensors"))
    # weights_only=True: these files hold only tensors and plain containers, nothing executable
    opt_states = torch.load(ckpt_dir / "optimizers.pt", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(opt_states[k])
    sched_states = torch.load(ckpt_dir / "schedulers.pt", weights_only=True)
    for k, s in schedulers.items():
        s.load_state_dict(sched_states[k])
    set_rng_state(torch.load(ckpt_dir / "rng.pt", weights_only=True))
    return state["step"], state["extra"]


def rng_state() -> dict:
    """Every generator a step draws from: torch's CPU one, each CUDA device's, and Python's."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
