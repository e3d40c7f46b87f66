"""Reward model: a one-output sequence classifier initialised from SFT, trained on pairs with
loss -logsigmoid(r_chosen - r_rejected - margin) (+ optional centering). The score is read at
the last non-pad token, found from the attention mask, so left and right padding both work;
with `padding_free` the pair rows are laid end to end and each score is read at its row's end;
with `share_prompt` each pair's prompt goes through the model once (`SharedPromptPairBatch`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_core.config import ModelConfig, RMConfig
from rlhf_core.data.batching import (PackedPairBatch, PairBatch, SharedPromptPairBatch, collate_pair_batch,
                                    collate_pairs)
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.losses import reward_pair_loss
from rlhf_core.training.context import RunContext, StageResult
from rlhf_core.training.modeling import (apply_lora, check_tokenizer_fits, last_token_scores, load_scalar_model,
                                         token_scores)
from rlhf_core.training.optim import optimizer_step
from rlhf_core.training.progress import Throughput, progress, scalars


def pair_rewards(model, batch: PairBatch | PackedPairBatch | SharedPromptPairBatch,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected rows, each (B,), from one forward over 2B rows."""
    ids = batch.input_ids.to(device)
    if isinstance(batch, SharedPromptPairBatch):
        ends = batch.ends.to(device)
        keep = torch.zeros(ids.numel(), dtype=torch.bool, device=device).index_fill_(0, ends, True).view(ids.shape)
        scores = token_scores(model, ids, batch.attention_mask.to(device), batch.position_ids.to(device), keep)
        return scores.reshape(-1)[ends].chunk(2)
    if isinstance(batch, PackedPairBatch):
        ends = batch.ends.to(device)
        scores = token_scores(model, ids, None, batch.position_ids.to(device), ends)
        return scores[0, ends].chunk(2)
    return last_token_scores(model, ids, batch.attention_mask.to(device)).chunk(2)


EVAL_KEYS = ("accuracy", "margin", "reward_chosen", "reward_rejected", "loss")
"""What `reward_pair_loss` reports, all means over pairs."""


@torch.no_grad()
def evaluate_rm(model, dataset, pad_id: int, cfg: RMConfig, device, rows: list[int] | None = None,
                total: Callable[[dict], dict] | None = None) -> dict[str, float]:
    """Held-out pair metrics (means over pairs). Several processes each pass their `rows` and a
    `total` that sums over processes; the means are then over the whole split."""
    if dataset is None or len(dataset) == 0:
        return {}
    rows = list(range(len(dataset))) if rows is None else rows
    model.eval()
    sums = {k: 0.0 for k in (*EVAL_KEYS, "pairs")}
    for i in range(0, len(rows), cfg.batch_size):
        c, r = pair_rewards(model, collate_pairs(dataset[rows[i:i + cfg.batch_size]], pad_id), device)
        _, m = reward_pair_loss(c, r, torch.full_like(c, cfg.margin), cfg.center_coef)
        for k in EVAL_KEYS:
            sums[k] += float(m[k]) * len(c)
        sums["pairs"] += len(c)
    model.train()
    sums = (total or dict)(sums)
    return {f"eval/{k}": sums[k] / sums["pairs"] for k in EVAL_KEYS}


def evaluate(ctx: RunContext, model, dataset, pad_id: int, cfg: RMConfig) -> dict[str, float]:
    """`evaluate_rm` on the unwrapped model (no collective inside its forward), each process on
    its share of the rows, in the precision the model trains in."""
    rows = ctx.eval_rows(len(dataset)) if dataset is not None else None
    with ctx.autocast():
        return evaluate_rm(ctx.accelerator.unwrap_model(model), dataset, pad_id, cfg, ctx.device, rows,
                           ctx.sum_over_processes)


def run_rm(ctx: RunContext, cfg: RMConfig, model_cfg: ModelConfig) -> StageResult:
    """Train a pairwise reward model from `ctx.inputs["init"]` on `preference/<ctx.train_split>`
    (the policy RM on `train`, the held-out judge RM on `judge`); both are evaluated on `preference/eval`."""
    ctx.seed(cfg.seed)
    stage, init = ctx.stage, ctx.input("init")
    tokenizer = load_tokenizer(init, model_cfg.trust_remote_code)
    pad = tokenizer.pad_token_id
    model = apply_lora(load_scalar_model(init, model_cfg, pad), cfg.lora, "SEQ_CLS")
    check_tokenizer_fits(model, tokenizer, init)
    train_ds, eval_ds = (load_split(ctx.input("data"), "preference", s, vocab_size=len(tokenizer))
                         for s in (ctx.train_split, "eval"))
    run = ctx.prepare(model, cfg)
    model, opt, sched, params, start = run.model, run.optimizer, run.scheduler, run.params, run.start
    batches = ctx.batches(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    speed, bar, metrics = Throughput(), progress(stage, cfg.max_steps, start, not ctx.is_main_process), {}
    model.train()
    for step in range(start, cfg.max_steps):
        micro = [collate_pair_batch(train_ds[next(batches)], pad, cfg.padding_free, cfg.share_prompt)
                 for _ in range(cfg.grad_accum)]
        step_loss, parts = torch.zeros(()), []
        for b in micro:
            with ctx.autocast():
                rc, rr = pair_rewards(model, b, ctx.device)
                margin = torch.full_like(rc, cfg.margin)
                w = b.weights.to(ctx.device)  # normalised by the mean over processes of their weight sums
                w_total = ctx.mean_over_processes({"w": w.sum()})["w"] if ctx.num_processes > 1 else None
                loss, m = reward_pair_loss(rc, rr, margin, cfg.center_coef, w, w_total)
            ctx.accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.detach().float().cpu() / cfg.grad_accum
            parts.append(m)
        grad_norm = optimizer_step(ctx.accelerator, params, opt, sched, cfg.max_grad_norm, stage, step + 1, step_loss)
        tps = speed.add(sum(b.tokens for b in micro))
        metrics = {f"train/{k}": sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}
        metrics.update({"train/loss": float(step_loss)})
        metrics = {**ctx.mean_over_processes(metrics), "train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.2f}", tok_s=f"{tps:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            metrics.update(evaluate(ctx, model, eval_ds, pad, cfg))
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps or "eval/accuracy" in metrics:
            ctx.log(metrics, done)
            ctx.log_timing({"train/tokens_per_second": tps}, done)
        ctx.end_of_step(done, cfg.max_steps, run.state)
    bar.close()
    metrics.update(evaluate(ctx, model, eval_ds, pad, cfg))
    ctx.log(metrics, cfg.max_steps)
    ctx.save_model(model, tokenizer, merge_lora=cfg.lora.merge)
    return StageResult(stage, cfg.max_steps, scalars(metrics), speed.timing(), start)
