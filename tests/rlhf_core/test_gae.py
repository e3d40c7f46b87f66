from __future__ import annotations

import pytest
import torch

from rlhf_core.ops.gae import compute_token_rewards, gae_advantages


def test_compute_token_rewards():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = compute_token_rewards(scores, kl, mask, kl_coef=0.5)
    want = torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, want)


def test_gae_three_steps_by_hand():
    # gamma = 0.9, lam = 0.8, V = (1, 2, 3), r = (0, 0, 1), then one padded position with junk
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(values, rewards, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 3 = -2,             A = -2
    # t=1: delta = 0.9*3 - 2 = 0.7,        A = 0.7 + 0.72*(-2) = -0.74
    # t=0: delta = 0.9*2 - 1 = 0.8,        A = 0.8 + 0.72*(-0.74) = 0.2672
    torch.testing.assert_close(adv, torch.tensor([[0.2672, -0.74, -2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.2672, 1.26, 1.0, 0.0]]))


def _naive_gae(values, rewards, mask, gamma, lam):
    b, t = values.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(mask[i].sum())  # contiguous run of ones starting at 0
        last = 0.0
        for s in reversed(range(n)):
            v_next = float(values[i, s + 1]) if s + 1 < n else 0.0
            delta = float(rewards[i, s]) + gamma * v_next - float(values[i, s])
            last = delta + gamma * lam * last
            adv[i, s] = last
    ret = (adv + values.double()) * mask
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, t = 5, 7
    values = torch.randn(b, t, generator=g)
    rewards = torch.randn(b, t, generator=g)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    adv, ret = gae_advantages(values, rewards, mask, gamma, lam)
    want_adv, want_ret = _naive_gae(values, rewards, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
