"""Per-token and per-sequence log-probabilities from causal-LM logits.

Convention: logits[:, t] is the model's prediction for token t + 1, so a sequence of T tokens
yields T - 1 scored positions.

Logits come either at every position, (B, T, V), or only where a trained token is predicted,
(N, V) in row-major order of `scored_mask(labels)`: what a transformers causal LM returns for
`logits_to_keep=scored_mask(labels)`, so the vocabulary projection never runs on prompt or padding
positions and no (B, T, V) tensor exists.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rlhf_core import IGNORE_INDEX


CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 1 << 28}
"""How much float32 per-position work over the vocabulary a backward (`_LogProbAt`, the LM loss's
`_CrossEntropyAt`) handles at a time, by device: on a CPU about a core's L2 cache, where a
chunk's several passes then run from cache (SmolLM2's 49,152 words, 1,100 positions, 2 threads:
the LM loss's forward and backward 135-190 ms at 1 MiB against 200-310 ms for `F.cross_entropy`,
300 ms at 50 MiB); on a GPU (and any other device) large enough that the chunks are few kernel
launches."""


def position_chunks(logits: torch.Tensor, *others: torch.Tensor):
    """Slices of `logits` (N, V) or (B, T, V) and of `others` that share its leading dims (targets,
    gradients, outputs), of at most `CHUNK_BYTES` of float32 logits each: (N, ...) along N,
    (B, T, ...) along T within each row b."""
    rows = max(1, CHUNK_BYTES.get(logits.device.type, CHUNK_BYTES["cuda"]) // (4 * logits.shape[-1]))
    tensors = (logits, *others)
    if logits.dim() == 2:
        yield from zip(*(t.split(rows) for t in tensors))
    else:
        for b in range(logits.shape[0]):
            yield from zip(*(t[b].split(rows) for t in tensors))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits, -1) gathered at `index`, without building the full (B, T, V) result.

    logits: (..., V); index: (...) long. Returns (...) in float32 (float64 for float64 logits).
    log p = logit[index] - logsumexp(logits): exact and memory-light in float32/float64.
    bf16/fp16 (autocast): a low-precision logsumexp loses accuracy, so rows are upcast a chunk at
    a time (`_chunks`: one (T, V) row, or a few hundred positions of (N, V)) and go through the
    same formula, so bf16 logits and the same logits upcast to float32 give identical log-probs.

    Under autograd (`_LogProbAt`) the same values come with no float32 copy kept for the backward:
    the logits are kept as they are, with their logsumexp, and the backward builds the gradient a
    chunk at a time (`position_chunks`). Plain autograd would keep every upcast chunk (the whole
    (N, V) in float32, twice the bf16 logits) and build the gradient of float32 logits as several
    whole (N, V) tensors (exp, the gather's zero-filled scatter, their sum).
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LogProbAt.apply(logits, index)
    return _log_prob_at(logits, index)[0]


def _chunks(logits: torch.Tensor) -> int:
    """Rows of low-precision `logits` upcast at a time in the forward: not `position_chunks`' few
    rows, since a `logsumexp` over fewer rows than threads splits each row's sum across threads
    (one row of 49,152: 1e-6 from the same row's in a larger tensor), and bf16 logits would no
    longer give what the same logits in float32 give."""
    return 1 if logits.dim() > 2 else 256  # (N, V): a few hundred positions at a time


def _log_prob_at(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit[index] - logsumexp, logsumexp) in float32 (float64), low precision a chunk at a time."""
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.logsumexp(logits, dim=-1)
        return torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1) - lse, lse
    n = _chunks(logits)
    parts = [_log_prob_at(part.float(), i) for part, i in zip(logits.split(n), index.split(n))]
    return torch.cat([p for p, _ in parts]), torch.cat([lse for _, lse in parts])


class _LogProbAt(torch.autograd.Function):
    """`selective_log_softmax` with a backward that keeps only the logits (in their own dtype) and
    their float32 logsumexp. The gradient of logit[index] - logsumexp is g (onehot - softmax),
    built a chunk of rows at a time in float32, in the operations and order plain autograd uses
    (`logsumexp`'s backward, grad * exp(logits - lse); then the gather's g added at the index; a
    low-precision chunk rounded to its dtype once), so the gradient is plain autograd's bit for
    bit (tests), without its whole-tensor temporaries."""

    @staticmethod
    def forward(ctx, logits, index):
        out, lse = _log_prob_at(logits, index)
        ctx.save_for_backward(logits, index, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, index, lse = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for part, i, s, g, dst in position_chunks(logits, index, lse, grad, out):
            x = part.to(lse.dtype)
            d = (-g).unsqueeze(-1) * (x - s.unsqueeze(-1)).exp()
            dst.copy_(d.scatter_add_(-1, i.unsqueeze(-1), g.unsqueeze(-1)))
        return out, None


def scored_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at position t when labels[:, t + 1] is trained (not -100); the last column
    is False. Passed as `logits_to_keep`, it makes the model project only these positions."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def scored_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N,): the trained tokens, in the order of the logits at `scored_mask(labels)`."""
    return labels[:, 1:][scored_mask(labels)[:, :-1]]


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]).

    logits: (B, T, V); input_ids: (B, T). Returns (B, T - 1).
    """
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:])


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probability of the trainable tokens of each sequence.

    logits: (B, T, V), or (N, V) at `scored_mask(labels)` only; labels: (B, T) with -100 marking
    tokens that are not scored (prompt, padding).
    Returns (B,) = sum_t [labels[:, t+1] != -100] * log p(labels[:, t+1] | prefix).
    A sum, not a mean: the DPO convention (TRL) for sequence log-likelihoods.
    Rows laid end to end (`PackedPairBatch`): labels (1, N), (N', V) logits, and `ends` (R,) the
    index of each row's last token; returns (R,).
    """
    if logits.dim() == 2:
        per_token = selective_log_softmax(logits, scored_targets(labels))
        where = scored_mask(labels).nonzero()
        rows, n = (where[:, 0], labels.shape[0]) if ends is None else (packed_rows(where[:, 1], ends), len(ends))
        return torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))  # never gather at -100
    per_token = selective_log_softmax(logits[:, :-1], safe_targets)
    return (per_token * keep.to(per_token.dtype)).sum(dim=-1)


def packed_rows(positions: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The row of each position of rows laid end to end, `ends` (R,) holding each row's last index."""
    return torch.searchsorted(ends.to(positions.device), positions)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, for right or left padding.

    attention_mask: (B, T) of 0/1 or bool. Returns (B,) long. A row with no 1 gives T - 1.
    """
    m = attention_mask.to(torch.long)
    t = m.shape[-1]
    # argmax returns the first maximum, so on the reversed mask it finds the last 1
    return (t - 1 - torch.argmax(m.flip(-1), dim=-1)).to(torch.long)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last_token_index(attention_mask)[b]].

    values: (B, T); attention_mask: (B, T). Returns (B,).
    """
    idx = last_token_index(attention_mask).to(values.device)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits) at each position, as a metric
    (no graph is kept).

    logits: (B, T, V). Returns (B, T) float32: H = logsumexp(z) - sum_v softmax(z)_v * z_v.
    Low-precision logits are upcast one row at a time, as in `selective_log_softmax`.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return _entropy(logits)
    return torch.stack([_entropy(row.float()) for row in logits])


def _entropy(z: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)
