"""PT and SFT: one causal-LM loop; they differ only in their data (packed blocks vs masked chats).

The loss is averaged over the trainable tokens of the whole accumulated batch, so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradient.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import ModelConfig, TrainConfig, to_dict
from rlhf_core.data.batching import collate_lm, index_batches
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.losses import lm_loss
from rlhf_core.training.loop import (
    LogFn,
    StageResult,
    Throughput,
    end_of_step,
    fingerprint,
    no_log,
    optimizer_step,
    prepare,
    progress,
    scalars,
)
from rlhf_core.training.modeling import (
    apply_lora,
    build_tiny_causal_lm,
    check_tokenizer_fits,
    forward_logits,
    load_causal_lm,
    save_model,
)
from rlhf_core.training.optim import seed_everything


@torch.no_grad()
def evaluate_lm(model, dataset, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Mean per-token loss over a held-out split."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        b = collate_lm(dataset[i:i + batch_size], pad_id)
        logits = forward_logits(model, b.input_ids.to(device), b.attention_mask.to(device))
        loss, m = lm_loss(logits, b.labels.to(device))
        total, count = total + float(loss) * int(m["tokens"]), count + int(m["tokens"])
    model.train()
    mean = total / max(1, count)
    return {"eval/loss": mean, "eval/perplexity": float(torch.exp(torch.tensor(mean)))}


def train_lm(stage: str, cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, out_dir: Path,
             ckpt_dir: Path, fp: str, log: LogFn = no_log) -> StageResult:
    pad = tokenizer.pad_token_id
    run = prepare(apply_lora(model, cfg.lora), cfg, ckpt_dir, fp)
    acc, model, opt, sched, params, state, start = (run.accelerator, run.model, run.optimizer, run.scheduler,
                                                    run.params, run.state, run.start)
    batches = index_batches(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    speed, bar, metrics = Throughput(), progress(stage, cfg.max_steps, start), {}
    model.train()
    for step in range(start, cfg.max_steps):
        micro = [collate_lm(train_ds[next(batches)], pad) for _ in range(cfg.grad_accum)]
        n_items = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)  # trainable tokens, whole step
        step_loss = torch.zeros(())
        for b in micro:
            with acc.autocast():
                logits = forward_logits(model, b.input_ids.to(acc.device), b.attention_mask.to(acc.device))
                loss, _ = lm_loss(logits, b.labels.to(acc.device), num_items=n_items)
            acc.backward(loss)
            step_loss += loss.detach().float().cpu()
        grad_norm = optimizer_step(acc, params, opt, sched, cfg.max_grad_norm, stage, step + 1, step_loss)
        tps = speed.add(sum(int(b.attention_mask.sum()) for b in micro))
        metrics = {"train/loss": float(step_loss), "train/grad_norm": grad_norm,
                   "train/lr": sched.get_last_lr()[0], "train/tokens_per_second": tps}
        bar.update(1)
        bar.set_postfix(loss=f"{float(step_loss):.3f}", tok_s=f"{tps:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            with acc.autocast():  # held-out numbers in the precision the model trains in
                metrics.update(evaluate_lm(model, eval_ds, pad, cfg.batch_size, acc.device))
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps or "eval/loss" in metrics:
            log(metrics, done)
        end_of_step(stage, cfg, done, ckpt_dir, fp, state)
    bar.close()
    with acc.autocast():
        metrics.update(evaluate_lm(model, eval_ds, pad, cfg.batch_size, acc.device))
    log(metrics, cfg.max_steps)
    save_model(acc.unwrap_model(model), tokenizer, out_dir, merge_lora=cfg.lora.merge)
    return StageResult(stage, cfg.max_steps, scalars(metrics), speed.seconds, metrics.get("train/tokens_per_second", 0.0), start)


def run_pt(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: Path, tokenizer_dir: Path,
           out_dir: Path, ckpt_dir: Path, log: LogFn = no_log) -> StageResult:
    """Continued pretraining on packed blocks; starts from `model.name_or_path` or the tiny model."""
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(tokenizer_dir, model_cfg.trust_remote_code)
    if model_cfg.name_or_path:
        model = load_causal_lm(model_cfg.name_or_path, model_cfg)
        check_tokenizer_fits(model, tokenizer, model_cfg.name_or_path)
    else:
        model = build_tiny_causal_lm(model_cfg, tokenizer, cfg.seed)
    train_ds, eval_ds = (load_split(data_dir, "pt", s, vocab_size=len(tokenizer)) for s in ("train", "eval"))
    fp = fingerprint({"stage": "pt", **to_dict(cfg), "model": to_dict(model_cfg)}, data_dir / "pt", tokenizer_dir)
    return train_lm("pt", cfg, model, tokenizer, train_ds, eval_ds, out_dir, ckpt_dir, fp, log)


def run_sft(cfg: TrainConfig, model_cfg: ModelConfig, data_dir: Path, init_dir: Path,
            out_dir: Path, ckpt_dir: Path, log: LogFn = no_log) -> StageResult:
    """Supervised fine-tuning on chats whose non-assistant tokens are masked."""
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(init_dir, model_cfg.trust_remote_code)
    model = load_causal_lm(init_dir, model_cfg)
    check_tokenizer_fits(model, tokenizer, init_dir)
    train_ds, eval_ds = (load_split(data_dir, "sft", s, vocab_size=len(tokenizer)) for s in ("train", "eval"))
    fp = fingerprint({"stage": "sft", **to_dict(cfg)}, data_dir / "sft", init_dir)
    return train_lm("sft", cfg, model, tokenizer, train_ds, eval_ds, out_dir, ckpt_dir, fp, log)
