"""Token-level rewards and Generalized Advantage Estimation for PPO on language models."""
from __future__ import annotations

import torch

from rlhf_core.ops.logprobs import last_token_index


def compute_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: a KL penalty on every response token plus the score on the last one.

    scores: (B,) reward-model scores; kl: (B, T) per-token KL estimates; mask: (B, T) marks
    response tokens. Returns (B, T): -kl_coef * kl * mask, with scores[b] added at the last
    position of row b where mask == 1 (Ziegler et al. 2019, R(x, y) = r(x, y) - beta KL).
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = last_token_index(mask).to(rewards.device)
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), scores.to(rewards.dtype).unsqueeze(-1))
    return rewards


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and returns (Schulman et al. 2016 eq. 16).

    values, rewards, mask: (B, T); mask is a contiguous run of ones per row (right-padded
    responses, e.g. 1,1,1,0,0). Returns (advantages, returns), each (B, T) and 0 outside mask.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V,
    with V and A taken as 0 past the end of the response.
    """
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    t_len = values.shape[-1]
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(t_len)):  # backward over time, vectorised over the batch
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv_t
        next_value = v[:, t]
        next_adv = adv_t
    returns = advantages + v  # both are already 0 outside the mask
    return advantages, returns
