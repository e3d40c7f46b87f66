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
    return _mean_over_items(per_token.sum(), shift_labels, _items(shift_labels, num_items))


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`lm_loss(F.linear(hidden, weight), labels, num_items)` with the LM head's product inside the
    loss, so that no (N, V) logits or logit gradient exist (`_LinearCrossEntropy`).

    hidden: (N, d), the model's final hidden states at `scored_mask(labels)` (what the model
    would project onto the vocabulary); weight: (V, d), the head's; labels: (B, T) as in
    `lm_loss`. Under autocast both are cast to its dtype, as `F.linear` would be. Same loss and
    metrics as `lm_loss`; the gradients are its own bit for bit where the positions fit in one
    chunk (`HEAD_CHUNK_BYTES`), else equal up to the order the chunks' head gradients are summed.
    In float16 it is `lm_loss` of the head's logits: the gradients made in the forward would be
    for the unscaled loss, where fp16 needs its gradient scaler's factor to keep them from
    underflowing.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    if dtype == torch.float16:  # fp16's gradient scaler multiplies only in the backward: gradients
        return lm_loss(F.linear(hidden, weight), labels, num_items)  # made unscaled would underflow
    targets = scored_targets(labels)
    divisor = _items(targets, num_items).to(hidden.device)
    # what `_mean_over_items`' division hands the sum back for a plain loss.backward(): 1 / divisor
    expected = torch.ones((), dtype=torch.float32, device=hidden.device) / divisor
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(hidden, weight, targets, expected, dtype)
    else:
        total = _linear_cross_entropy(hidden, weight, targets, expected, dtype, False, False)[0]
    return _mean_over_items(total, targets, divisor)


def _items(targets: torch.Tensor, num_items) -> torch.Tensor:
    """The loss's divisor as a float32 tensor: `num_items`, or the trained targets' count clamped to 1."""
    if num_items is None:
        return (targets != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    return torch.as_tensor(num_items, dtype=torch.float32, device=targets.device)


def _mean_over_items(total: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """`lm_loss`'s loss (the summed cross-entropy `total` over `divisor`, from `_items`) and metrics."""
    tokens = (targets != IGNORE_INDEX).sum()
    loss = total / divisor.to(total.device)
    metrics = {
        "loss": (total / tokens.clamp(min=1)).detach(),
        "tokens": tokens.detach(),
    }
    return loss, metrics


def _cross_entropy_into(out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """out[...] = per-position `F.cross_entropy` of `logits` at `targets` (0 at -100), in float32,
    a chunk of positions at a time (`position_chunks`)."""
    for x, t, o in position_chunks(logits, targets, out):
        o.copy_(F.cross_entropy(x.float(), t, ignore_index=IGNORE_INDEX, reduction="none"))


def _cross_entropy_grad_into(out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> None:
    """out[...] = the gradient of sum(grad * cross-entropy) with respect to `logits`, in their dtype:
    per chunk, the float32 log-softmax again, nll's gradient, then log-softmax's, rounded once; the
    operations autograd runs for `F.cross_entropy(x.float())`, so it is autograd's bit for bit."""
    for x, t, g, dst in position_chunks(logits, targets, grad, out):
        lsm = torch.log_softmax(x.float(), -1)
        trained = t != IGNORE_INDEX
        nll = torch.zeros_like(lsm).scatter_(-1, torch.where(trained, t, 0)[:, None],
                                             torch.where(trained, -g, 0)[:, None])
        dst.copy_(torch._log_softmax_backward_data(nll, lsm, -1, lsm.dtype))


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
        _cross_entropy_into(out, logits, targets)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        _cross_entropy_grad_into(out, logits, targets, grad)
        return out, None


HEAD_CHUNK_BYTES = 1 << 28
"""The most float32 logits `_LinearCrossEntropy` makes at a time (256 MiB: 1,365 positions of
SmolLM2's 49,152 words, 441 of Qwen2.5's 151,936). Within a chunk the cross-entropy runs in
`position_chunks`' cache-sized pieces. Smaller chunks would add a pass over the head's (V, d)
gradient each, and on a CPU products of fewer rows."""


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, t_i) over hidden (N, d), weight W (V, d) and targets (N,) (-100
    adds 0), in `dtype` (`_linear_cross_entropy`), with both gradients made in the forward: the
    loss is a scalar, so they are made for the gradient the sum will be handed (`expected`: what
    the caller's division passes back) and kept, and the backward hands them on, or scales them
    when another gradient arrives (a scaled loss). Kept for the backward: the (N, d) and (V, d)
    gradients, where autograd would keep the (N, V) logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, expected, dtype):
        total, grad_h, grad_w = _linear_cross_entropy(hidden, weight, targets, expected, dtype, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w, expected)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_h, grad_w, expected = ctx.saved_tensors
        if not torch.equal(grad, expected):  # a scaled loss: the kept gradients were made for `expected`
            ratio = grad / expected
            grad_h = None if grad_h is None else grad_h * ratio.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * ratio
        return (None if grad_h is None else grad_h.to(ctx.dtypes[0]),
                None if grad_w is None else grad_w.to(ctx.dtypes[1]), None, None, None)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, expected: torch.Tensor,
                          dtype: torch.dtype, want_h: bool, want_w: bool):
    """(sum of the cross-entropy, its gradient for `hidden` or None, for `weight` or None), the
    gradients of `expected` * the sum: the head's product, the cross-entropy and the gradients a
    chunk of `HEAD_CHUNK_BYTES` positions at a time, so neither the (N, V) logits nor their
    gradient exist, only one chunk's. Each chunk runs the operations autograd runs for `F.linear`
    (in `dtype`, as autocast casts) and `_CrossEntropyAt` (the weight's gradient as G^T hidden, as
    autograd makes it for a transposed weight): one chunk gives autograd's gradients bit for bit;
    more sum the chunks' weight gradients in float32."""
    with torch.autocast(hidden.device.type, enabled=False):
        x, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(x) if want_h else None
        grad_w = None
        rows = max(1, HEAD_CHUNK_BYTES // (4 * weight.shape[0]))
        for lo in range(0, x.shape[0], rows):
            xc, tc = x[lo:lo + rows], targets[lo:lo + rows]
            logits = xc @ w.t()  # (c, V)
            per_token = torch.empty(tc.shape, dtype=torch.float32, device=x.device)
            _cross_entropy_into(per_token, logits, tc)
            total += per_token.sum()
            if not (want_h or want_w):
                continue
            g = torch.empty_like(logits)  # d(expected * sum) / d(logits)
            _cross_entropy_grad_into(g, logits, tc, expected.expand(tc.shape))
            del logits  # as autograd frees them before the head's backward
            if want_h:
                torch.mm(g, w, out=grad_h[lo:lo + rows])
            if want_w:  # the first chunk's product is the gradient (no zero-fill, no sum, when one chunk)
                grad_w = (g.t() @ xc).float() if grad_w is None else grad_w.add_(g.t() @ xc)
        if want_w and grad_w is None:  # no position
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return total, grad_h, grad_w


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
