"""Sampling responses from a policy, as PPO rollouts and the evaluation need them."""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_core.batching import PromptBatch


class Rollout(NamedTuple):
    sequences: torch.Tensor       # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, P + R) 0 on padding and after the first EOS
    response_mask: torch.Tensor   # (B, R) 1 on response tokens up to and including EOS
    prompt_length: int            # P
    has_eos: torch.Tensor         # (B,) bool


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, R) that keeps tokens up to and including the first EOS, and whether one exists.
    Works when pad == eos because it looks only at the first EOS."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long(), has_eos


@torch.no_grad()
def sample(model, batch: PromptBatch, eos_id: int, pad_id: int, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                       top_k=top_k or None, top_p=top_p)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_id, pad_token_id=pad_id, **kwargs)
    model.train(was_training)
    P = ids.shape[1]
    responses = out[:, P:]
    if responses.shape[1] == 0:  # generation stopped before emitting anything
        responses = torch.full((ids.shape[0], 1), eos_id, device=device)
    rmask, has_eos = response_mask(responses, eos_id)
    sequences = torch.cat([ids, responses], 1)
    return Rollout(sequences, torch.cat([mask, rmask], 1), rmask, P, has_eos)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    rows = []
    for seq, m in zip(rollout.sequences[:, rollout.prompt_length:], rollout.response_mask):
        rows.append(tokenizer.decode(seq[m.bool()].tolist(), skip_special_tokens=True).strip())
    return rows
