"""Two processes under `accelerate launch` (gloo on CPU) against one process with the doubled batch.

accelerate 1.15 starts several CPU processes only through its torchrun launcher
(`--multi_gpu`; `--cpu --num_processes 2` without MPI starts one process), so the run is launched
that way with CUDA hidden: DDP on CPU with the gloo backend, as on a CPU-only host.

What it shows (`distributed_run.py` is the launched script and holds the configs):
- SFT, RM and DPO with 2 processes x per-device batch B give the same per-step losses, held-out
  metrics and final weights as 1 process x batch 2B, within TOL;
- PPO runs on 2 processes, each rolling out its own prompts, and its logged metrics are the
  means (counts: sums) over both processes' rollouts;
- a stop requested on the main process only stops both after the same step; the checkpoint
  says 2 processes wrote it (with each one's random generators); resuming with 2 processes ends
  where the uninterrupted run ended, and resuming with 1 raises an error naming both numbers.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import context
from distributed_run import DPO, PPO, RM, SFT, TINY, doubled
from safetensors.torch import load_file

from rlhf_core.config import TokenizeConfig
from rlhf_core.data import formats
from rlhf_core.data.encoding import tokenize_datasets
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.demo import data as demo_data
from rlhf_core.stages.dpo import run_dpo
from rlhf_core.stages.lm import run_sft
from rlhf_core.stages.rm import run_rm
from rlhf_core.training.checkpoint import CheckpointError
from rlhf_core.training.modeling import build_tiny_causal_lm, save_model

pytestmark = pytest.mark.slow

TOL = 1e-5
"""Tolerance of 2 x B against 1 x 2B (float32 on CPU): on weights absolute, on logged metrics
relative to max(1, |value|) (perplexity is exp(loss), ~300 here). The two differ only in the
order of float sums (two half-batch sums and DDP's average of two gradients against one sum) and
in padding widths; each test prints the largest difference measured.

Weights get WEIGHT_TOL: AdamW moves every weight by about lr per step (3e-3 here), and for a weight
whose gradient is itself near zero, float noise in that gradient changes its step noticeably
(measured: 2.4e-5 on one RM weight, 2.7e-6 in DPO, 2e-8 in SFT)."""
WEIGHT_TOL = 1e-4

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(root: Path) -> None:
    """Demo SFT chats, preference pairs and prompts tokenised under root/tok; an untrained tiny
    model under root/base."""
    demo_data.generate(root / "raw", demo_data.DemoDataConfig(n_pt_docs=10, n_sft=40, n_preferences=24,
                                                             n_prompts=16, n_eval_prompts=2))
    convs = formats.read_conversations(root / "raw" / "sft.jsonl")
    prefs = formats.read_preferences(root / "raw" / "preferences.jsonl")
    prompts = formats.read_prompts(root / "raw" / "prompts.jsonl")
    tok = train_tokenizer([t.content for c in convs for t in c.turns], TINY.vocab_size)
    tokenize_datasets(tok, TokenizeConfig(max_length=64, block_size=32, max_prompt_length=32, max_response_length=32,
                                          eval_fraction=0.2),
                      root / "tok", conversations=convs, preferences=prefs, prompts=prompts)
    save_model(build_tiny_causal_lm(TINY, tok, seed=0), tok, root / "base")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread) -> SimpleNamespace:
    """The two-process run (launched once), then the one-process references at batch 2B."""
    root = tmp_path_factory.mktemp("distributed")
    _build(root)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(HERE / "distributed_run.py"), str(root)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((root / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]

    one, history = root / "one", {}

    def run(stage, fn, cfg, **inputs):
        rows = history.setdefault(stage, [])
        ctx = context(stage, cfg, one / stage, one / "ckpt" / stage, lambda m, s: rows.append([s, m]), **inputs)
        return fn(ctx, cfg, TINY).to_dict()["metrics"]

    results = {"sft": run("sft", run_sft, doubled(SFT), data=root / "tok", init=root / "base")}
    results["rm"] = run("rm", run_rm, doubled(RM), data=root / "tok", init=one / "sft")
    results["dpo"] = run("dpo", run_dpo, doubled(DPO), data=root / "tok", init=one / "sft")
    return SimpleNamespace(root=root, ranks=ranks, two=root / "two", one=one, history=history, results=results)


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_of_batch_b_match_one_process_of_batch_2b(runs, stage):
    two, one = runs.ranks[0]["history"][stage], runs.history[stage]
    assert [s for s, _ in two] == [s for s, _ in one] and len(one) == {"sft": 5, "rm": 4, "dpo": 4}[stage]
    diffs = {}
    for (_, m2), (_, m1) in zip(two, one):
        assert m2.keys() == m1.keys()
        for k in m1:
            if k != "train/lr":
                diffs[k] = max(diffs.get(k, 0.0), abs(m2[k] - m1[k]) / max(1.0, abs(m1[k])))
    weights = _max_weight_diff(runs.two / stage, runs.one / stage)
    print(f"\n{stage}: 2 x B vs 1 x 2B: max |diff| / max(1, |value|) per logged metric {diffs}; final weights {weights:.2e}")
    assert any(k.startswith("eval/") for k in diffs)  # held-out metrics, split between the processes, too
    assert max(diffs.values()) < TOL and weights < WEIGHT_TOL
    if stage != "rm":  # the model did train: the reference is matched, not the start (RM's head starts random)
        assert _max_weight_diff(runs.two / stage, runs.root / "base" if stage == "sft" else runs.two / "sft") > 1e-3
    # both processes return the same (gathered) metrics
    assert runs.ranks[1]["results"][stage] == runs.ranks[0]["results"][stage]


def test_ppo_runs_on_two_processes_and_logs_metrics_gathered_over_both(runs):
    main, other = runs.ranks
    logged = [m for _, m in main["history"]["ppo"]]
    assert len(logged) == PPO.max_steps and (runs.two / "ppo" / "model.safetensors").is_file()
    for it, m in enumerate(logged):
        mine, theirs = main["ppo_local"][it], other["ppo_local"][it]
        assert len(mine["scores"]) == len(theirs["scores"]) == PPO.rollout_batch_size  # each its own rollout
        assert mine["scores"] != theirs["scores"]  # different prompts / samples
        want = (sum(mine["scores"]) / len(mine["scores"]) + sum(theirs["scores"]) / len(theirs["scores"])) / 2
        assert m["objective/scores"] == pytest.approx(want, abs=1e-6)
        assert m["val/num_eos_tokens"] == mine["eos"] + theirs["eos"]
    assert other["results"]["ppo"] == main["results"]["ppo"]
    # the adaptive controller moved by the gathered KL, identically on both processes
    assert logged[1]["objective/kl_coef"] != logged[0]["objective/kl_coef"]


def test_a_two_process_run_stopped_mid_stage_resumes_with_two_and_refuses_one(runs):
    for rank in runs.ranks:  # a request on the main process stopped both after step 2
        assert rank["stopped"]["signum"] == 15 and "stopped by SIGTERM after step 2" in rank["stopped"]["message"]
    state = runs.ranks[0]["stopped_state"]
    assert state["step"] == 2 and state["num_processes"] == 2
    assert {"rng.pt", "rng.1.pt"} <= set(runs.ranks[0]["ckpt_files"])
    main = runs.ranks[0]
    assert [s for s, _ in main["history"]["sft_resumed"]] == [3, 4, 4]
    resumed, straight = main["results"]["sft_resumed"], main["results"]["sft"]
    for k in ("train/loss", "eval/loss"):
        assert resumed[k] == pytest.approx(straight[k], abs=1e-6), k
    assert _max_weight_diff(runs.two / "sft_stopped", runs.two / "sft") < 1e-6


def test_resuming_a_two_process_checkpoint_with_one_process_names_both_numbers(runs, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs.two / "ckpt" / "sft_stopped", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["step"] != 2:  # the resumed run left its own checkpoint; take the stopped one's shape
        pytest.fail(f"unexpected checkpoint step {state['step']}")
    ctx = context("sft", SFT, tmp_path / "out", ckpt, data=runs.root / "tok", init=runs.root / "base")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), but this run has 1"):
        run_sft(ctx, SFT, TINY)
    assert not (tmp_path / "out").exists()
