from __future__ import annotations

import math

import pytest
import torch
from conftest import devices, saved_bytes

from rlhf_core.ops.logprobs import (
    entropy_from_logits,
    gather_last,
    last_token_index,
    selective_log_softmax,
    sequence_logprobs,
    token_logprobs,
)


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selective_log_softmax_parity_with_naive_log_softmax_then_gather(dtype):
    logits = _rand((3, 5, 17), 0, dtype)
    index = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(1))
    got = selective_log_softmax(logits, index)
    # the naive version: the full (B, T, V) log-softmax in float32, then gather
    want = torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # low precision: rows are upcast first
    if dtype != torch.float32:  # and bf16 logits give exactly what the same values in float32 give
        assert torch.equal(got, selective_log_softmax(logits.float(), index))


def test_selective_log_softmax_keeps_the_graph_for_the_policy_gradient():
    logits = _rand((2, 3, 5), 7).requires_grad_(True)
    index = torch.tensor([[0, 1, 2], [3, 4, 0]])
    selective_log_softmax(logits, index).sum().backward()
    naive = logits.detach().clone().requires_grad_(True)
    torch.log_softmax(naive, -1).gather(-1, index.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits.grad, naive.grad)


def test_selective_log_softmax_hand_value():
    # uniform over 4 classes -> log(1/4) everywhere
    logits = torch.zeros(1, 2, 4)
    out = selective_log_softmax(logits, torch.tensor([[0, 3]]))
    torch.testing.assert_close(out, torch.full((1, 2), -math.log(4.0)))


def test_token_logprobs_shift():
    logits = _rand((2, 4, 7), 2)
    ids = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 1]])
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 3)
    lsm = torch.log_softmax(logits, dim=-1)
    assert out[1, 0].item() == pytest.approx(lsm[1, 0, 5].item(), abs=1e-6)
    assert out[0, 2].item() == pytest.approx(lsm[0, 2, 4].item(), abs=1e-6)


def test_sequence_logprobs_vs_naive_loop():
    b, t, v = 3, 6, 9
    logits = _rand((b, t, v), 3)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, :] = -100  # nothing trainable
    labels[2, 5] = 2
    out = sequence_logprobs(logits, labels)

    lsm = torch.log_softmax(logits, dim=-1)
    for i in range(b):
        total = 0.0
        for s in range(t - 1):
            tgt = int(labels[i, s + 1])
            if tgt != -100:
                total += lsm[i, s, tgt].item()
        assert out[i].item() == pytest.approx(total, abs=1e-5)
    # a row whose only label is at position 0 contributes nothing (position 0 is never predicted)
    labels2 = torch.full((1, t), -100)
    labels2[0, 0] = 3
    assert sequence_logprobs(logits[:1], labels2).item() == 0.0


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 0]])
    r = last_token_index(right)
    assert r.dtype == torch.long and r.tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 3]
    assert last_token_index(right.bool()).tolist() == [2, 4, 0]

    values = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    torch.testing.assert_close(gather_last(values, right), torch.tensor([2.0, 9.0, 10.0]))
    torch.testing.assert_close(gather_last(values, left), torch.tensor([4.0, 9.0, 13.0]))


def test_entropy_from_logits():
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    # two classes with p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335...
    two = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert entropy_from_logits(two).item() == pytest.approx(0.5623351446, abs=1e-6)
    logits = _rand((2, 3, 11), 5)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * torch.log(p)).sum(-1))


def test_entropy_is_a_metric_without_graph_and_upcasts_low_precision_rows():
    logits = _rand((2, 3, 11), 6).requires_grad_(True)
    h = entropy_from_logits(logits)
    assert not h.requires_grad
    low = logits.detach().to(torch.bfloat16)
    got = entropy_from_logits(low)
    assert got.dtype == torch.float32
    p = torch.softmax(low.float(), -1)
    torch.testing.assert_close(got, -(p * torch.log(p)).sum(-1))


def test_bf16_logits_at_scored_positions_are_upcast_in_chunks_and_match_float32():
    """(N, V) low-precision logits (the `scored_mask` form) go through the same formula in float32,
    a few hundred rows at a time: equal to the float32 result, for N across a chunk boundary."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(600, 50, generator=g).to(torch.bfloat16)
    index = torch.randint(0, 50, (600,), generator=g)
    got = selective_log_softmax(logits, index)
    assert got.dtype == torch.float32 and got.shape == (600,)
    assert torch.equal(got, selective_log_softmax(logits.float(), index))


def _plain_autograd_log_prob_at(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The straightforward form under autograd: logit[index] - logsumexp, low precision upcast a
    chunk of rows at a time; autograd keeps what it keeps."""
    def picked_minus_lse(x, i):
        return x.gather(-1, i.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)

    if logits.dtype == torch.float32:
        return picked_minus_lse(logits, index)
    n = 1 if logits.dim() > 2 else 256
    return torch.cat([picked_minus_lse(p.float(), i) for p, i in zip(logits.split(n), index.split(n))])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(600, 50), (3, 7, 50)])
def test_selective_log_softmax_under_autograd_is_plain_autograd_bit_for_bit(dtype, shape, device, monkeypatch):
    """Lever (memory): the log-probs and their gradient under autograd are exactly what plain
    autograd gives, for (N, V) across the forward's chunk boundary and (B, T, V), in float32 and
    bf16, with an upstream gradient that differs at every position (as the DPO and PPO losses
    give), the backward in chunks of 3 positions; on CUDA (the GPU tests of
    `benchmarks/gpu/run.sh`) as on the CPU."""
    from rlhf_core.ops import logprobs

    monkeypatch.setattr(logprobs, "CHUNK_BYTES", {"cpu": 3 * 4 * 50, "cuda": 3 * 4 * 50})
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(shape, generator=g) * 4).to(device, dtype)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    upstream = torch.randn(shape[:-1], generator=g).to(device)
    ours, plain = (base.clone().requires_grad_(True) for _ in range(2))
    got, want = selective_log_softmax(ours, index), _plain_autograd_log_prob_at(plain, index)
    assert torch.equal(got, want)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert ours.grad.dtype == dtype and torch.equal(ours.grad, plain.grad)


def test_selective_log_softmax_keeps_no_float32_copy_of_low_precision_logits():
    """bf16 logits: the graph keeps them as they are (and one float32 value per row), where plain
    autograd keeps their float32 upcast, twice their size."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1000, 512, generator=g).to(torch.bfloat16).requires_grad_(True)
    index = torch.randint(0, 512, (1000,), generator=g)
    size = logits.numel() * logits.element_size()
    ours = saved_bytes(lambda: selective_log_softmax(logits, index))
    plain = saved_bytes(lambda: _plain_autograd_log_prob_at(logits, index))
    assert plain >= 2 * size
    assert size <= ours <= size + 1000 * (4 + 8) + 4096  # the logits, the logsumexp, the index
