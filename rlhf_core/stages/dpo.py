"""DPO against a frozen SFT reference (Rafailov et al. 2023).

Chosen and rejected go through one concatenated forward. A sequence's log-prob is the sum over
its response tokens only. Under LoRA the reference is the same weights with the adapters
disabled, so no second copy is held; otherwise the reference is a frozen copy. Reference
log-probs can be computed once before training (`precompute_ref`).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import DPOConfig, ModelConfig, to_dict
from rlhf_core.data.batching import PairBatch, collate_pairs, index_batches
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.ops.logprobs import sequence_logprobs
from rlhf_core.ops.losses import dpo_loss
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
    check_tokenizer_fits,
    forward_logits,
    is_peft,
    load_causal_lm,
    save_model,
)
from rlhf_core.training.optim import seed_everything


def pair_logprobs(model, batch: PairBatch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, each (B,), and the chosen-token count (B,)."""
    logits = forward_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    labels = batch.labels.to(device)
    logps = sequence_logprobs(logits, labels)
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected, n_tokens.chunk(2)[0]


class Reference:
    """Reference log-probs: adapters disabled on the policy (LoRA) or a frozen copy."""

    def __init__(self, policy, init_dir: Path, model_cfg: ModelConfig, device):
        self.policy, self.device = policy, device
        self.copy = None
        if not is_peft(policy):
            self.copy = load_causal_lm(init_dir, model_cfg).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.copy if self.copy is not None else self.policy
        ctx = nullcontext() if self.copy is not None else self.policy.disable_adapter()
        with ctx:
            c, r, _ = pair_logprobs(model, batch, self.device)
        return c, r


def precompute_reference(ref: Reference, dataset, pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2) reference log-probs of every row, chosen then rejected."""
    out = []
    for i in range(0, len(dataset), batch_size):
        c, r = ref.logprobs(collate_pairs(dataset[i:i + batch_size], pad_id))
        out.append(torch.stack([c, r], -1).cpu())
    return torch.cat(out)


def step_loss(policy, ref: Reference, batch: PairBatch, ref_logps: torch.Tensor | None, cfg: DPOConfig, device):
    pi_c, pi_r, n_c = pair_logprobs(policy, batch, device)
    ref_c, ref_r = ref.logprobs(batch) if ref_logps is None else ref_logps.to(device).unbind(-1)
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    if cfg.rpo_alpha > 0:  # RPO: NLL of the chosen response, per token
        nll = -(pi_c / n_c.clamp(min=1)).mean()
        loss = loss + cfg.rpo_alpha * nll
        m["nll/chosen"] = nll.detach()
    return loss, m


@torch.no_grad()
def evaluate_dpo(policy, ref: Reference, dataset, pad_id: int, cfg: DPOConfig, device) -> dict[str, float]:
    if dataset is None or len(dataset) == 0:
        return {}
    policy.eval()
    sums, n = {}, 0
    for i in range(0, len(dataset), cfg.batch_size):
        b = collate_pairs(dataset[i:i + cfg.batch_size], pad_id)
        _, m = step_loss(policy, ref, b, None, cfg, device)
        k = len(b.weights)
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + float(v) * k
        n += k
    policy.train()
    return {f"eval/{k}": v / n for k, v in sums.items()}


def run_dpo(cfg: DPOConfig, model_cfg: ModelConfig, data_dir: Path, init_dir: Path, out_dir: Path,
            ckpt_dir: Path, log: LogFn = no_log) -> StageResult:
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(init_dir, model_cfg.trust_remote_code)
    pad = tokenizer.pad_token_id
    policy = load_causal_lm(init_dir, model_cfg)
    check_tokenizer_fits(policy, tokenizer, init_dir)
    policy = apply_lora(policy, cfg.lora)
    train_ds, eval_ds = (load_split(data_dir, "preference", s, vocab_size=len(tokenizer)) for s in ("train", "eval"))
    fp = fingerprint({"stage": "dpo", **to_dict(cfg)}, data_dir / "preference", init_dir)
    run = prepare(policy, cfg, ckpt_dir, fp)
    acc, policy, opt, sched, params, state, start = (run.accelerator, run.model, run.optimizer, run.scheduler,
                                                     run.params, run.state, run.start)
    ref = Reference(acc.unwrap_model(policy), init_dir, model_cfg, acc.device)
    with acc.autocast():  # the same precision as the policy's forward, so step 0 has log-ratio 0
        ref_table = precompute_reference(ref, train_ds, pad, cfg.batch_size) if cfg.precompute_ref else None
    batches = index_batches(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.grad_accum)
    speed, bar, metrics = Throughput(), progress("dpo", cfg.max_steps, start), {}
    policy.train()
    for step in range(start, cfg.max_steps):
        idx = [next(batches) for _ in range(cfg.grad_accum)]
        total, parts = torch.zeros(()), []
        for ix in idx:
            b = collate_pairs(train_ds[ix], pad)
            with acc.autocast():
                loss, m = step_loss(policy, ref, b, None if ref_table is None else ref_table[ix], cfg, acc.device)
            acc.backward(loss / cfg.grad_accum)
            total += loss.detach().float().cpu() / cfg.grad_accum
            parts.append(m)
            speed.add(int(b.attention_mask.sum()))
        grad_norm = optimizer_step(acc, params, opt, sched, cfg.max_grad_norm, "dpo", step + 1, total)
        metrics = {f"train/{k}": sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}
        metrics.update({"train/loss": float(total), "train/grad_norm": grad_norm, "train/lr": sched.get_last_lr()[0],
                        "train/tokens_per_second": speed.add(0)})
        bar.update(1)
        bar.set_postfix(loss=f"{float(total):.3f}", acc=f"{metrics['train/rewards/accuracies']:.2f}",
                        tok_s=f"{metrics['train/tokens_per_second']:.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            with acc.autocast():  # held-out numbers in the precision the model trains in
                metrics.update(evaluate_dpo(policy, ref, eval_ds, pad, cfg, acc.device))
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps or "eval/loss" in metrics:
            log(metrics, done)
        end_of_step("dpo", cfg, done, ckpt_dir, fp, state)
    bar.close()
    with acc.autocast():
        metrics.update(evaluate_dpo(policy, ref, eval_ds, pad, cfg, acc.device))
    log(metrics, cfg.max_steps)
    save_model(acc.unwrap_model(policy), tokenizer, out_dir, merge_lora=cfg.lora.merge)
    return StageResult("dpo", cfg.max_steps, scalars(metrics), speed.seconds, metrics.get("train/tokens_per_second", 0.0), start)
