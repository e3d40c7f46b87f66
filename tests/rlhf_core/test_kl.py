from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.ops.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    make_kl_controller,
)


def test_k1_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -2.0, -1.5]])
    # k1 = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[-1.0, 0.0, 1.0]]))
    k3 = kl_penalty(logp, ref, "k3")
    # log r = ref - logp = 1 -> r = e -> k3 = e - 1 - 1 = e - 2
    assert k3[0, 0].item() == pytest.approx(math.e - 2, abs=1e-6)
    assert k3[0, 1].item() == 0.0
    # log r = -1 -> k3 = (1/e - 1) + 1 = 1/e
    assert k3[0, 2].item() == pytest.approx(math.exp(-1), abs=1e-6)
    assert torch.all(kl_penalty(torch.randn(4, 4), torch.randn(4, 4), "k3") >= 0)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k2")


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_controller_hand_update_and_round_trip():
    c = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    # KL 9 is 50% above target; error clipped to +0.2: 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.100512, rel=1e-12)
    # KL 5: error = 5/6 - 1 = -1/6 (unclipped): 0.100512 * (1 - 256 / 60000)
    c.update(5.0, 256)
    assert c.value == pytest.approx(0.100512 * (1 - 256 / 60000), rel=1e-12)

    state = c.state_dict()
    other = AdaptiveKLController(init_coef=1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    other.update(0.0, 10000)  # error clipped to -0.2 over a full horizon -> * 0.8
    assert other.value == pytest.approx(state["value"] * 0.8)


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.2), FixedKLController)
    a = make_kl_controller("adaptive", 0.2, target=6.0, horizon=100)
    assert isinstance(a, AdaptiveKLController) and a.value == 0.2
    with pytest.raises(ValueError):
        make_kl_controller("pid", 0.2, 6.0, 100)
    with pytest.raises(ValueError):
        make_kl_controller("adaptive", 0.2)
