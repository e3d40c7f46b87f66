"""Training objectives for SFT, reward modelling, DPO/IPO and PPO.

Every loss returns `(loss, metrics)`: `loss` is a 0-dim tensor carrying gradients, `metrics` a
dict of detached 0-dim tensors. Nothing here logs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rlhf_core import IGNORE_INDEX
from rlhf_core.ops.logprobs import position_chunks, scored_targets
from rlhf_core.ops.masked import masked_mean

Metrics = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- language modelling


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Next-token cross-entropy, summed over trainable tokens and divided by `num_items`.

    logits: (B, T, V), or (N, V) at `scored_mask(labels)` only (see `ops.logprobs`); labels:
    (B, T), -100 marks tokens that are not trained on.
    num_items: trainable-token count of the whole accumulated batch (all micro-batches of one
    optimizer step), so that summing micro-batch losses reproduces the full-batch mean exactly.
    None divides by this batch's own trainable-token count (clamped to 1, so a batch with no
    trainable token gives a zero loss rather than NaN).
    Metrics: `loss` (mean per token over this batch), `tokens` (trainable tokens in this batch).

    The cross-entropy is `F.cross_entropy`'s, a chunk of positions at a time (`_CrossEntropyAt`):
    the same per-token values and the same gradient bit for bit (tests), with only the logits kept
    for the backward, where `F.cross_entropy` keeps a float32 log-softmax of every position and
    builds whole (N, V) gradients in its backward (the vocabulary's share of a step's memory).
    """
    if logits.dim() == 2:
        shift_labels = scored_targets(labels)
        per_token = _CrossEntropyAt.apply(logits, shift_labels)
    else:
        shift_labels = labels[:, 1:]
        per_token = _CrossEntropyAt.apply(logits[:, :-1], shift_labels)
    total = per_token.sum()
    tokens = (shift_labels != IGNORE_INDEX).sum()
    denom = tokens.clamp(min=1) if num_items is None else num_items
    if isinstance(denom, torch.Tensor):
        denom = denom.to(device=total.device, dtype=total.dtype)
    loss = total / denom
    metrics = {
        "loss": (total / tokens.clamp(min=1)).detach(),
        "tokens": tokens.detach(),
    }
    return loss, metrics


class _CrossEntropyAt(torch.autograd.Function):
    """Per-position cross-entropy of logits (N, V) or (B, T, V) at `targets` (N,) or (B, T), 0 where
    a target is -100: `F.cross_entropy(x.float(), t, reduction="none")` a chunk of positions at a
    time (`position_chunks`), keeping only the logits (in their own dtype) for the backward. The
    backward redoes each chunk's float32 log-softmax and runs the operations autograd would
    (nll's gradient, then log-softmax's, rounded once to the logits' dtype), so its gradient is
    `F.cross_entropy`'s bit for bit, holding one chunk's float32 temporaries instead of several
    (N, V) tensors."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for x, t, o in position_chunks(logits, targets, out):
            o.copy_(F.cross_entropy(x.float(), t, ignore_index=IGNORE_INDEX, reduction="none"))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for x, t, g, dst in position_chunks(logits, targets, grad, out):
            lsm = torch.log_softmax(x.float(), -1)
            trained = t != IGNORE_INDEX
            nll = torch.zeros_like(lsm).scatter_(-1, torch.where(trained, t, 0)[:, None],
                                                 torch.where(trained, -g, 0)[:, None])
            dst.copy_(torch._log_softmax_backward_data(nll, lsm, -1, lsm.dtype))
        return out, None


# --------------------------------------------------------------------------- reward model


def reward_pair_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    weights: torch.Tensor | None = None,
    weight_total: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry pairwise loss for a scalar reward model.

    r_chosen, r_rejected: (B,) rewards of the preferred / dispreferred responses.
    margin: (B,) optional required gap (Llama-2 style), subtracted inside the sigmoid.
    weights: (B,) optional per-pair weights; loss = sum(w * l) / sum(w). Giving each of the
    K(K-1)/2 pairs of a K-response ranking weight 1 / (K(K-1)/2) makes the prompt one unit
    (InstructGPT, Ouyang et al. 2022 eq. 1).
    center_coef: adds center_coef * mean((r_c + r_r)^2), which keeps rewards near zero mean.
    weight_total: the weighted sum's divisor instead of sum(w) (with several processes: the mean
    over processes of their sum(w), so that averaging their gradients weighs every pair alike).
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    per_pair = -F.logsigmoid(diff)  # -log sigma(r_c - r_r - m)
    if weights is None:
        loss = per_pair.mean()
    else:
        w = weights.to(per_pair.dtype)
        loss = (w * per_pair).sum() / (w.sum() if weight_total is None else weight_total)
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    metrics = {
        "accuracy": (r_chosen > r_rejected).float().mean().detach(),
        "margin": (r_chosen - r_rejected).mean().detach(),
        "reward_chosen": r_chosen.mean().detach(),
        "reward_rejected": r_rejected.mean().detach(),
        "loss": loss.detach(),
    }
    return loss, metrics


# --------------------------------------------------------------------------- DPO family


def _dpo_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: torch.Tensor,
) -> Metrics:
    """Implicit rewards beta * log(pi / pi_ref) and log-prob summaries, named as TRL names them."""
    chosen_reward = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_reward = (beta * (policy_rejected - ref_rejected)).detach()
    return {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean(),
        "rewards/margins": (chosen_reward - rejected_reward).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
        "loss": loss.detach(),
    }


def _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = log(pi_c / ref_c) - log(pi_r / ref_r), shape (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO loss (Rafailov et al. 2023 eq. 7), optionally label-smoothed (cDPO).

    All inputs: (B,) summed sequence log-probs under the policy / frozen reference.
    loss = mean(-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)), eps = label_smoothing,
    i.e. the preference label is assumed flipped with probability eps.
    """
    h = _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    # Rafailov et al. 2023 eq. 7; the eps term is conservative DPO (Mitchell 2023)
    per_pair = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    loss = per_pair.mean()
    return loss, _dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """IPO loss (Azar et al. 2023 eq. 17): mean((h - 1 / (2 beta))^2).

    All inputs: (B,) sequence log-probs. Here `beta` plays the role of the paper's tau.
    Note: TRL's DPOTrainer feeds IPO length-averaged log-probs (sum / number of tokens) rather
    than sums; this function takes whatever it is given, so the caller decides which.
    """
    h = _log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()  # Azar et al. 2023 eq. 17
    return loss, _dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Dispatch to `dpo_sigmoid_loss` ("sigmoid") or `ipo_loss` ("ipo"); inputs (B,) each."""
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing
        )
    if loss_type == "ipo":
        return ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")


# --------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, negated for minimisation.

    logprobs, old_logprobs, advantages, mask: (B, T) over response tokens.
    loss = masked_mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logprobs - old).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # PPO clipped surrogate, Schulman et al. 2017 eq. 7 (max of negatives = min of objectives)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/clipfrac": masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), mask),
            "val/ratio": masked_mean(ratio, mask),
            "loss/policy": loss.detach(),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value-function loss.

    values, old_values, returns, mask: (B, T).
    loss = 0.5 * masked_mean(max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)).
    """
    clipped_values = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    # pessimistic value clipping as in OpenAI baselines ppo2 / Ziegler et al. 2019
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.detach(),
            "value/clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask),
        }
    return loss, metrics
