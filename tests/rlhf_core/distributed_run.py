"""One process of the two-process CPU run that `test_distributed.py` launches with
`accelerate launch --multi_gpu --num_processes 2` (gloo): SFT, RM, DPO and PPO with per-device
batch B, then an SFT run stopped after step 2 and resumed with the same two processes.

Usage: python distributed_run.py ROOT. ROOT holds `tok` (tokenised data) and `base` (an untrained
tiny model); this writes ROOT/two/<stage> models and ROOT/two/rank<i>.json with what process i saw
(the main process's logged history, every process's returned metrics, PPO's per-process scores).
The configs live here so that the test runs the one-process reference with the same ones at 2B."""
from __future__ import annotations

import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_core.config import DPOConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)
B = 4
"""Per-device batch of the two-process run; the one-process reference uses 2B."""
COMMON = {"learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler": "constant", "save_every": 0, "eval_every": 2,
          "log_every": 1}
SFT = SFTConfig(max_steps=4, batch_size=B, **COMMON)
RM = RMConfig(max_steps=3, batch_size=B, **COMMON)
DPO = DPOConfig(max_steps=3, batch_size=B, beta=0.1, **COMMON)
PPO = PPOConfig(max_steps=2, batch_size=B, rollout_batch_size=B, ppo_epochs=1, max_new_tokens=6,
                kl_controller="adaptive", kl_coef=0.1, kl_target=0.01, kl_horizon=20, **{**COMMON, "eval_every": 0})


def doubled(cfg):
    """The one-process config equivalent to two processes of `cfg`."""
    fields = {"batch_size": 2 * cfg.batch_size}
    if isinstance(cfg, PPOConfig):
        fields["rollout_batch_size"] = 2 * cfg.rollout_batch_size
    return replace(cfg, **fields)


def main(root: Path) -> None:
    torch.set_num_threads(1)
    from conftest import context  # tests/ is on sys.path (see the test's PYTHONPATH)

    from rlhf_core.stages import ppo
    from rlhf_core.stages.dpo import run_dpo
    from rlhf_core.stages.lm import run_sft
    from rlhf_core.stages.rm import run_rm
    from rlhf_core.training.stop import Stopped, StopRequest

    out, data = root / "two", root / "tok"
    history: dict[str, list] = {}
    results: dict[str, dict] = {}
    local_scores: list[dict] = []
    score_rollout = ppo.score_rollout

    def recording_score(rollout, *args):  # this process's own rollout scores, before any gathering
        scores = score_rollout(rollout, *args)
        local_scores.append({"scores": scores.tolist(), "eos": int(rollout.has_eos.sum())})
        return scores
    ppo.score_rollout = recording_score

    def run(stage, fn, cfg, key=None, log=None, stop=None, **inputs):
        """Run `fn` as `stage` (its folders); history and results under `key` (default: stage)."""
        key = key or stage
        rows = history.setdefault(key, [])
        ctx = context(stage, cfg, out / stage, out / "ckpt" / stage, log or (lambda m, s: rows.append([s, m])), **inputs)
        ctx.stop = stop or ctx.stop
        results[key] = fn(ctx, cfg, TINY).to_dict()["metrics"]
        return ctx

    ctx = run("sft", run_sft, SFT, data=data, init=root / "base")
    run("rm", run_rm, RM, data=data, init=out / "sft")
    run("dpo", run_dpo, DPO, data=data, init=out / "sft")
    run("ppo", ppo.run_ppo, PPO, data=data, init=out / "sft", reward=out / "rm")

    # stopped after step 2 by a request on the main process only: both processes must stop there
    stop, stopped = StopRequest(), {}

    def stop_after_step_2(metrics, step):  # called on the main process only
        history.setdefault("sft_stopped", []).append([step, metrics])
        if step == 2:
            stop.set(signal.SIGTERM)
    try:
        run("sft_stopped", run_sft, SFT, log=stop_after_step_2, stop=stop if ctx.is_main_process else None,
            data=data, init=root / "base")
    except Stopped as e:
        stopped = {"message": str(e), "signum": e.signum}
    ckpt = out / "ckpt" / "sft_stopped"
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    ckpt_files = sorted(p.name for p in ckpt.iterdir())
    run("sft_stopped", run_sft, SFT, key="sft_resumed", data=data, init=root / "base")
    record = {"rank": ctx.process_index, "num_processes": ctx.num_processes, "history": history,
              "results": results, "ppo_local": local_scores, "stopped": stopped,
              "stopped_state": trainer_state, "ckpt_files": ckpt_files}
    (out / f"rank{ctx.process_index}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
