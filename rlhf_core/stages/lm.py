"""PT and SFT: one causal-LM loop; they differ only in their data (packed blocks vs masked chats).

The loss is averaged over the trainable tokens of the whole accumulated batch, so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradient.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import ModelConfig, TrainConfig
from rlhf_core.data.batching import LMBatch, PackedLMBatch, collate_lm, collate_lm_packed
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.logprobs import scored_mask
from rlhf_core.ops.losses import lm_head_loss, lm_loss
from rlhf_core.training.context import RunContext, StageResult
from rlhf_core.training.modeling import (
    apply_lora,
    build_tiny_causal_lm,
    check_tokenizer_fits,
    forward_logits,
    forward_packed_logits,
    head_deferred,
    load_causal_lm,
)
from rlhf_core.training.optim import optimizer_step
from rlhf_core.training.progress import Throughput, progress, scalars


def batch_loss(model, b: LMBatch | PackedLMBatch, device, num_items=None) -> tuple[torch.Tensor, dict]:
    """`lm_loss` of a padded or a padding-free batch, projecting onto the vocabulary only at the
    positions that predict a trained token (`scored_mask`; no prompt or padding position), and,
    where the model allows (`head_deferred`), inside the loss a chunk of positions at a time
    (`lm_head_loss`), so that no (N, V) logits exist."""
    keep, labels = scored_mask(b.labels), b.labels.to(device)
    with head_deferred(model) as head:
        if isinstance(b, PackedLMBatch):
            out = forward_packed_logits(model, b.input_ids.to(device), b.position_ids.to(device), keep)
        else:
            out = forward_logits(model, b.input_ids.to(device), b.attention_mask.to(device), keep)
    if head is None:
        return lm_loss(out, labels, num_items)
    return lm_head_loss(out, head, labels, num_items)  # out: the (N, d) hidden states


@torch.no_grad()
def evaluate_lm(model, dataset, pad_id: int, batch_size: int, device, rows: list[int] | None = None,
                total: Callable[[dict], dict] | None = None) -> dict[str, float]:
    """Mean per-token loss over a held-out split. Several processes each pass their `rows` and a
    `total` that sums over processes; the mean is then over the whole split."""
    if dataset is None or len(dataset) == 0:
        return {}
    rows = list(range(len(dataset))) if rows is None else rows
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = collate_lm(dataset[rows[i:i + batch_size]], pad_id)
        loss, m = batch_loss(model, b, device)
        loss_sum, count = loss_sum + float(loss) * int(m["tokens"]), count + int(m["tokens"])
    model.train()
    sums = (total or dict)({"loss": loss_sum, "tokens": count})
    mean = sums["loss"] / max(1, sums["tokens"])
    return {"eval/loss": mean, "eval/perplexity": float(torch.exp(torch.tensor(mean)))}


def evaluate(ctx: RunContext, model, dataset, pad_id: int, batch_size: int) -> dict[str, float]:
    """`evaluate_lm` on the unwrapped model (no collective inside its forward), each process on
    its share of the rows, in the precision the model trains in."""
    rows = ctx.eval_rows(len(dataset)) if dataset is not None else None
    with ctx.autocast():
        return evaluate_lm(ctx.accelerator.unwrap_model(model), dataset, pad_id, batch_size, ctx.device, rows,
                           ctx.sum_over_processes)


def train_lm(ctx: RunContext, cfg: TrainConfig, model, tokenizer, kind: str, padding_free: bool = False) -> StageResult:
    """The causal-LM loop on the `kind` split (`pt` blocks or `sft` chats) of `ctx`'s data;
    `padding_free` lays each micro-batch end to end in one row (`PackedLMBatch`)."""
    stage, pad = ctx.stage, tokenizer.pad_token_id
    train_ds, eval_ds = (load_split(ctx.input("data"), kind, s, vocab_size=len(tokenizer)) for s in (ctx.train_split, "eval"))
    run = ctx.prepare(apply_lora(model, cfg.lora), cfg)
    model, opt, sched, params, start = run.model, run.optimizer, run.scheduler, run.params, run.start
    batches = ctx.batches(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    speed, bar, metrics = Throughput(), progress(stage, cfg.max_steps, start, not ctx.is_main_process), {}
    model.train()
    for step in range(start, cfg.max_steps):
        rows = [train_ds[next(batches)] for _ in range(cfg.grad_accum)]
        micro = [collate_lm_packed(r) if padding_free else collate_lm(r, pad) for r in rows]
        # trainable tokens of the whole step, as a mean over processes: DDP averages the gradients
        # of the processes, so each divides its token sum by (global count / num_processes)
        n_items = ctx.mean_over_processes({"n": sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)})["n"]
        step_loss = torch.zeros(())
        for b in micro:
            with ctx.autocast():
                loss, _ = batch_loss(model, b, ctx.device, n_items)
            ctx.accelerator.backward(loss)
            step_loss += loss.detach().float().cpu()
        grad_norm = optimizer_step(ctx.accelerator, params, opt, sched, cfg.max_grad_norm, stage, step + 1, step_loss)
        tps = speed.add(sum(len(ids) for r in rows for ids in r["input_ids"]))  # real tokens, padding excluded
        metrics = {**ctx.mean_over_processes({"train/loss": step_loss}),  # = the global batch's mean
                   "train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{tps:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            metrics.update(evaluate(ctx, model, eval_ds, pad, cfg.batch_size))
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps or "eval/loss" in metrics:
            ctx.log(metrics, done)
            ctx.log_timing({"train/tokens_per_second": tps}, done)
        ctx.end_of_step(done, cfg.max_steps, run.state)
    bar.close()
    metrics.update(evaluate(ctx, model, eval_ds, pad, cfg.batch_size))
    ctx.log(metrics, cfg.max_steps)
    ctx.save_model(model, tokenizer, merge_lora=cfg.lora.merge)
    return StageResult(stage, cfg.max_steps, scalars(metrics), speed.timing(), start)


def run_pt(ctx: RunContext, cfg: TrainConfig, model_cfg: ModelConfig) -> StageResult:
    """Continued pretraining on packed blocks; starts from `model.name_or_path` or the tiny model
    (with the tokenizer of `ctx.inputs["tokenizer"]`)."""
    ctx.seed(cfg.seed)
    tokenizer = load_tokenizer(ctx.input("tokenizer"), model_cfg.trust_remote_code)
    if model_cfg.name_or_path:
        model = load_causal_lm(model_cfg.name_or_path, model_cfg)
        check_tokenizer_fits(model, tokenizer, model_cfg.name_or_path)
    else:
        model = build_tiny_causal_lm(model_cfg, tokenizer, cfg.seed)
    return train_lm(ctx, cfg, model, tokenizer, "pt")


def run_sft(ctx: RunContext, cfg: TrainConfig, model_cfg: ModelConfig) -> StageResult:
    """Supervised fine-tuning of `ctx.inputs["init"]` on chats whose non-assistant tokens are masked."""
    ctx.seed(cfg.seed)
    init = ctx.input("init")
    tokenizer = load_tokenizer(init, model_cfg.trust_remote_code)
    model = load_causal_lm(init, model_cfg)
    check_tokenizer_fits(model, tokenizer, init)
    return train_lm(ctx, cfg, model, tokenizer, "sft", cfg.padding_free)
