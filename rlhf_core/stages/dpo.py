"""DPO against a frozen SFT reference (Rafailov et al. 2023).

Chosen and rejected go through one concatenated forward. A sequence's log-prob is the sum over
its response tokens only. Under LoRA the reference is the same weights with the adapters
disabled, so no second copy is held; otherwise the reference is a frozen copy. Reference
log-probs can be computed once before training (`precompute_ref`). With `padding_free` the pair
rows of a micro-batch are laid end to end, for the policy and the reference alike.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import DPOConfig, ModelConfig
from rlhf_core.data.batching import PackedPairBatch, PairBatch, collate_pair_batch, collate_pairs
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.logprobs import packed_rows, scored_mask, sequence_logprobs
from rlhf_core.ops.losses import dpo_loss
from rlhf_core.training.context import RunContext, StageResult
from rlhf_core.training.frozen import Frozen, reference
from rlhf_core.training.modeling import (
    apply_lora,
    check_tokenizer_fits,
    forward_logits,
    forward_packed_logits,
    load_causal_lm,
)
from rlhf_core.training.optim import optimizer_step
from rlhf_core.training.progress import Throughput, progress, scalars


def pair_logprobs(model, batch: PairBatch | PackedPairBatch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, each (B,), and the chosen-token count (B,)."""
    labels = batch.labels.to(device)
    keep = scored_mask(labels)  # (N, V) logits: only the response positions are projected
    if isinstance(batch, PackedPairBatch):
        ends = batch.ends.to(device)
        logits = forward_packed_logits(model, batch.input_ids.to(device), batch.position_ids.to(device), keep)
        logps = sequence_logprobs(logits, labels, ends)
        n_tokens = torch.bincount(packed_rows((labels[0] != IGNORE_INDEX).nonzero()[:, 0], ends), minlength=len(ends))
    else:
        logits = forward_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device), keep)
        logps = sequence_logprobs(logits, labels)
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected, n_tokens.chunk(2)[0]


def reference_logprobs(ref: Frozen, batch: PairBatch | PackedPairBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of the frozen reference, each (B,)."""
    c, r, _ = ref(pair_logprobs, batch, device)
    return c, r


def precompute_reference(ref: Frozen, dataset, pad_id: int, batch_size: int, device,
                         rows: list[int] | None = None, padding_free: bool = False) -> torch.Tensor:
    """(N, 2) reference log-probs, chosen then rejected, of every row, or only of `rows` (the rows
    a run will draw; NaN elsewhere): a run shorter than an epoch scores what it trains on. Rows are
    scored in fixed chunks of `batch_size` in dataset order whichever are asked for, so a row's
    value never depends on which others a run needs: a resumed run gets the same values, bit for
    bit, as the uninterrupted one. `padding_free` lays each chunk out as training does."""
    out = torch.full((len(dataset), 2), float("nan"))
    wanted = None if rows is None else set(rows)
    for i in range(0, len(dataset), batch_size):
        chunk = range(i, min(i + batch_size, len(dataset)))
        if wanted is not None and wanted.isdisjoint(chunk):
            continue
        c, r = reference_logprobs(ref, collate_pair_batch(dataset[i:chunk.stop], pad_id, padding_free), device)
        out[i:chunk.stop] = torch.stack([c, r], -1).cpu()
    return out


def step_loss(policy, ref: Frozen, batch: PairBatch | PackedPairBatch, ref_logps: torch.Tensor | None,
              cfg: DPOConfig, device):
    pi_c, pi_r, n_c = pair_logprobs(policy, batch, device)
    ref_c, ref_r = reference_logprobs(ref, batch, device) if ref_logps is None else ref_logps.to(device).unbind(-1)
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    if cfg.rpo_alpha > 0:  # RPO: NLL of the chosen response, per token
        nll = -(pi_c / n_c.clamp(min=1)).mean()
        loss = loss + cfg.rpo_alpha * nll
        m["nll/chosen"] = nll.detach()
    return loss, m


@torch.no_grad()
def evaluate_dpo(policy, ref: Frozen, dataset, pad_id: int, cfg: DPOConfig, device, rows: list[int] | None = None,
                 total: Callable[[dict], dict] | None = None) -> dict[str, float]:
    """Held-out DPO metrics (means over pairs). Several processes each pass their `rows` and a
    `total` that sums over processes; the means are then over the whole split."""
    if dataset is None or len(dataset) == 0:
        return {}
    rows = list(range(len(dataset))) if rows is None else rows
    keys = EVAL_KEYS + (("nll/chosen",) if cfg.rpo_alpha > 0 else ())
    policy.eval()
    sums = {k: 0.0 for k in (*keys, "pairs")}
    for i in range(0, len(rows), cfg.batch_size):
        b = collate_pairs(dataset[rows[i:i + cfg.batch_size]], pad_id)
        _, m = step_loss(policy, ref, b, None, cfg, device)
        k = len(b.weights)
        for key in keys:
            sums[key] += float(m[key]) * k
        sums["pairs"] += k
    policy.train()
    sums = (total or dict)(sums)
    return {f"eval/{k}": sums[k] / sums["pairs"] for k in keys}


EVAL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "loss")
"""What `dpo_loss` reports, all means over pairs."""


def evaluate(ctx: RunContext, policy, ref: Frozen, dataset, pad_id: int, cfg: DPOConfig) -> dict[str, float]:
    """`evaluate_dpo` on the unwrapped policy (no collective inside its forward), each process on
    its share of the rows, in the precision the policy trains in."""
    rows = ctx.eval_rows(len(dataset)) if dataset is not None else None
    with ctx.autocast():
        return evaluate_dpo(ctx.accelerator.unwrap_model(policy), ref, dataset, pad_id, cfg, ctx.device, rows,
                            ctx.sum_over_processes)


def run_dpo(ctx: RunContext, cfg: DPOConfig, model_cfg: ModelConfig) -> StageResult:
    """DPO of the policy `ctx.inputs["init"]` against itself, frozen, as the reference."""
    ctx.seed(cfg.seed)
    stage, init = ctx.stage, ctx.input("init")
    tokenizer = load_tokenizer(init, model_cfg.trust_remote_code)
    pad = tokenizer.pad_token_id
    policy = load_causal_lm(init, model_cfg)
    check_tokenizer_fits(policy, tokenizer, init)
    policy = apply_lora(policy, cfg.lora)
    train_ds, eval_ds = (load_split(ctx.input("data"), "preference", s, vocab_size=len(tokenizer))
                         for s in (ctx.train_split, "eval"))
    run = ctx.prepare(policy, cfg)
    policy, opt, sched, params, start = run.model, run.optimizer, run.scheduler, run.params, run.start
    # under the policy's autocast, so step 0 has log-ratio 0
    ref = reference(ctx.accelerator.unwrap_model(policy), lambda: load_causal_lm(init, model_cfg), ctx.device, ctx.autocast)
    batches = ctx.batches(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    planned = [next(batches) for _ in range((cfg.max_steps - start) * cfg.grad_accum)]  # this run's micro-batches
    ref_table = (precompute_reference(ref, train_ds, pad, cfg.batch_size, ctx.device, [i for b in planned for i in b],
                                      cfg.padding_free) if cfg.precompute_ref else None)
    batches = iter(planned)
    speed, bar, metrics = Throughput(), progress(stage, cfg.max_steps, start, not ctx.is_main_process), {}
    policy.train()
    for step in range(start, cfg.max_steps):
        idx = [next(batches) for _ in range(cfg.grad_accum)]
        total, parts = torch.zeros(()), []
        for ix in idx:
            b = collate_pair_batch(train_ds[ix], pad, cfg.padding_free)
            with ctx.autocast():
                loss, m = step_loss(policy, ref, b, None if ref_table is None else ref_table[ix], cfg, ctx.device)
            ctx.accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach().float().cpu() / cfg.grad_accum
            parts.append(m)
            speed.add(b.tokens)
        grad_norm = optimizer_step(ctx.accelerator, params, opt, sched, cfg.max_grad_norm, stage, step + 1, total)
        tps = speed.add(0)
        metrics = {f"train/{k}": sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}
        metrics.update({"train/loss": float(total)})  # means over pairs: each process holds as many
        metrics = {**ctx.mean_over_processes(metrics), "train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0]}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/rewards/accuracies']:.2f}", tok_s=f"{tps:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            metrics.update(evaluate(ctx, policy, ref, eval_ds, pad, cfg))
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps or "eval/loss" in metrics:
            ctx.log(metrics, done)
            ctx.log_timing({"train/tokens_per_second": tps}, done)
        ctx.end_of_step(done, cfg.max_steps, run.state)
    bar.close()
    metrics.update(evaluate(ctx, policy, ref, eval_ds, pad, cfg))
    ctx.log(metrics, cfg.max_steps)
    ctx.save_model(policy, tokenizer, merge_lora=cfg.lora.merge)
    return StageResult(stage, cfg.max_steps, scalars(metrics), speed.timing(), start)
