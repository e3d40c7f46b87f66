"""A checkpoint restores every random generator a step draws from: torch's CPU generator,
Python's, and (where CUDA is present) each CUDA device's."""
from __future__ import annotations

import random

import torch

from rlhf_core.training import checkpoint
from rlhf_core.training.checkpoint import load_checkpoint, save_checkpoint


def _state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"models": {"m": model}, "optimizers": {"o": opt},
            "schedulers": {"s": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}}


def test_cpu_and_python_generators_continue_where_the_checkpoint_left_them(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(0), random.seed(0)
    save_checkpoint(tmp_path / "ck", "fp", 3, **_state(model))
    want = (torch.rand(3), random.random())
    torch.manual_seed(123), random.seed(123)
    assert load_checkpoint(tmp_path / "ck", "fp", **_state(model)) == (3, {})
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_cuda_generators_are_saved_and_restored(tmp_path, monkeypatch):
    """Without a GPU here, CUDA's generator calls are replaced by a recorder of what they get."""
    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "ck", "fp", 1, **_state(model))
    load_checkpoint(tmp_path / "ck", "fp", **_state(model))
    assert len(restored) == 1 and [t.tolist() for t in restored[0]] == [[1, 2, 3], [4, 5]]
    assert "cuda" in torch.load(tmp_path / "ck" / "rng.pt", weights_only=True)
    assert checkpoint.rng_state()["cuda"] is saved


def test_a_checkpoint_records_its_processes_and_refuses_another_number(tmp_path):
    """Written by 2 processes (each with its generators): process 1 restores its own; 1 process is refused,
    naming both numbers; a checkpoint from before the count was recorded counts as 1 process."""
    import json

    import pytest

    from rlhf_core.training.checkpoint import CheckpointError

    model = torch.nn.Linear(2, 2)
    torch.manual_seed(0)
    rank0 = checkpoint.rng_state()
    torch.manual_seed(1)
    rank1 = checkpoint.rng_state()
    want = torch.rand(3)  # what process 1 draws next
    save_checkpoint(tmp_path / "ck", "fp", 4, **_state(model), rng_states=[rank0, rank1])
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and (tmp_path / "ck" / "rng.1.pt").is_file()
    torch.manual_seed(123)
    assert load_checkpoint(tmp_path / "ck", "fp", **_state(model), num_processes=2, process_index=1) == (4, {})
    assert torch.equal(torch.rand(3), want)
    with pytest.raises(CheckpointError, match=r"ck: this checkpoint was written by 2 process\(es\), but this run "
                                              r"has 1; .* Run with 2 process\(es\) to resume, or delete .*ck to start"):
        load_checkpoint(tmp_path / "ck", "fp", **_state(model))
    assert load_checkpoint(tmp_path / "ck", "other", **_state(model)) is None  # other settings: start fresh
    del state["num_processes"]
    (tmp_path / "ck" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"written by 1 process\(es\), but this run has 2"):
        load_checkpoint(tmp_path / "ck", "fp", **_state(model), num_processes=2)
