"""Resumable training state: weights, optimizers, schedulers, RNG, step and stage extras.

A checkpoint is written to a temporary folder and renamed into place, and carries a fingerprint
of the config and inputs; a checkpoint whose fingerprint differs is ignored, so changing a
parameter never resumes a run that belongs to other settings. A corrupted checkpoint is skipped
with a warning naming the file, and the stage starts fresh (only the latest checkpoint is kept).

It also records how many processes wrote it, with each process's random generators (`rng.pt`
for process 0, `rng.<i>.pt` for process i): a run with another number of processes would see
other data and other random streams, so resuming it that way is an error naming both numbers.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from rlhf_core.atomic import atomic_dir
from rlhf_core.errors import RLHFError


class CheckpointError(RLHFError):
    """A checkpoint of this stage's settings cannot be resumed as asked."""


def rng_file(process_index: int) -> str:
    return "rng.pt" if process_index == 0 else f"rng.{process_index}.pt"


def save_checkpoint(ckpt_dir: Path, fingerprint: str, step: int, models: dict, optimizers: dict,
                    schedulers: dict, extra: dict | None = None, rng_states: list[dict] | None = None) -> None:
    """`rng_states`: every process's `rng_state()` in process order (default: this process's
    alone); their number is the number of processes recorded."""
    rng_states = rng_states or [rng_state()]
    with atomic_dir(ckpt_dir) as tmp:
        for name, model in models.items():
            save_model(model, str(tmp / f"{name}.safetensors"))
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizers.pt")
        torch.save({k: s.state_dict() for k, s in schedulers.items()}, tmp / "schedulers.pt")
        for i, rng in enumerate(rng_states):
            torch.save(rng, tmp / rng_file(i))
        state = {"fingerprint": fingerprint, "step": step, "num_processes": len(rng_states), "extra": extra or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _warn(path: Path, why: str) -> None:
    print(f"warning: {path}: {why}; ignoring this checkpoint and starting the stage fresh", file=sys.stderr)


def read_state(ckpt_dir: Path) -> dict | None:
    """`trainer_state.json` of a checkpoint, or None (with a warning naming it) if it is unreadable."""
    state_file = Path(ckpt_dir) / "trainer_state.json"
    if not state_file.exists():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if not (isinstance(state, dict) and isinstance(state.get("fingerprint"), str)
                and isinstance(state.get("step"), int) and isinstance(state.get("extra", {}), dict)
                and isinstance(state.get("num_processes", 1), int)):
            raise ValueError("missing fingerprint, step or extra, or a non-integer num_processes")
    except (ValueError, UnicodeDecodeError) as e:
        _warn(state_file, f"corrupted ({e})")
        return None
    return state


def check_processes(ckpt_dir: Path, state: dict, num_processes: int) -> None:
    """A checkpoint resumes only with the number of processes that wrote it (1 if unrecorded)."""
    written = state.get("num_processes", 1)
    if written != num_processes:
        raise CheckpointError(
            f"{ckpt_dir}: this checkpoint was written by {written} process(es), but this run has {num_processes}; "
            f"resuming it would change the data order and the random streams. Run with {written} process(es) "
            f"to resume, or delete {ckpt_dir} to start the stage fresh")


def load_checkpoint(ckpt_dir: Path, fingerprint: str, models: dict, optimizers: dict,
                    schedulers: dict, num_processes: int = 1, process_index: int = 0) -> tuple[int, dict] | None:
    """Restore everything in place and return (step, extra), or None if there is nothing to resume.
    Process `process_index` of `num_processes` restores its own random generators.

    Every file is read and checked before anything is restored, so a corrupted checkpoint (skipped
    with a warning naming the file) never leaves a half-restored model behind."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if state is None or state["fingerprint"] != fingerprint:
        return None
    check_processes(ckpt_dir, state, num_processes)
    loaded = {}
    for name, file in (("optimizers", "optimizers.pt"), ("schedulers", "schedulers.pt"), ("rng", rng_file(process_index))):
        f = ckpt_dir / file
        try:  # weights_only=True: these files hold only tensors and plain containers, nothing executable
            loaded[name] = torch.load(f, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged pickle/zip
            _warn(f, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return None
    missing = [k for k in optimizers if k not in loaded["optimizers"]] + [k for k in schedulers if k not in loaded["schedulers"]]
    if missing:
        _warn(ckpt_dir, f"holds no state for {', '.join(missing)}")
        return None
    for name in models:
        f = ckpt_dir / f"{name}.safetensors"
        try:
            load_file(str(f))  # reads and checks every tensor; load_model below then restores it
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            _warn(f, f"unreadable ({type(e).__name__}: {e})")
            return None
    for name, model in models.items():
        load_model(model, str(ckpt_dir / f"{name}.safetensors"))
    for k, o in optimizers.items():
        o.load_state_dict(loaded["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(loaded["schedulers"][k])
    set_rng_state(loaded["rng"])
    return state["step"], state.get("extra", {})


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
