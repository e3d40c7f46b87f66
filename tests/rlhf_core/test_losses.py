from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import devices, saved_bytes

from rlhf_core.ops.logprobs import selective_log_softmax
from rlhf_core.ops.losses import (
    dpo_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    lm_head_loss,
    lm_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_pair_loss,
)

LN2 = math.log(2.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------- lm_loss


def _lm_batch():
    g = _gen(0)
    b, t, v = 8, 6, 13
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    # very uneven trainable-token counts per row, so a mean of per-row means would differ
    for i in range(b):
        labels[i, : 1 + (i % 5)] = -100
    return logits, labels


def test_lm_loss_matches_cross_entropy_mean():
    logits, labels = _lm_batch()
    loss, metrics = lm_loss(logits, labels)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert int(metrics["tokens"]) == int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scored", [False, True])
def test_lm_loss_value_and_gradient_are_cross_entropys(dtype, scored, device, monkeypatch):
    """Lever (memory): the loss a chunk of positions at a time against `F.cross_entropy` on the
    same logits upcast to float32, for padded (B, T, V) logits and for the (N, V) form at
    `scored_mask`, in float32 and bf16, in chunks of 3 positions (rows of 5 or fewer, 27 scored
    positions): the same value (its sum taken in another order) and the same gradient bit for
    bit; on CUDA (the GPU tests of `benchmarks/gpu/run.sh`) as on the CPU."""
    from rlhf_core.ops import logprobs
    from rlhf_core.ops.logprobs import scored_mask

    logits, labels = _lm_batch()
    logits, labels = (logits * 3).to(device, dtype), labels.to(device)
    if scored:
        logits = logits[scored_mask(labels)]
    ours, ref = (logits.clone().requires_grad_(True) for _ in range(2))
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", {"cpu": 3 * 4 * 13, "cuda": 3 * 4 * 13})
    loss, _ = lm_loss(ours, labels, num_items=7)
    loss.backward()
    flat = ref.float() if scored else ref[:, :-1].reshape(-1, 13).float()
    targets = labels[:, 1:][labels[:, 1:] != -100] if scored else labels[:, 1:].reshape(-1)
    want = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / 7
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    assert ours.grad.dtype == dtype and torch.equal(ours.grad, ref.grad)
    assert ours.grad.abs().max() > 0.01  # a gradient that is there to compare


def test_lm_loss_keeps_no_float32_copy_of_bf16_logits():
    """What the loss's graph keeps for its backward: bf16 logits as they are (and one float32 value
    per position), where `F.cross_entropy` on their upcast keeps a float32 log-softmax, twice
    their size."""
    g = _gen(5)
    logits = torch.randn(1000, 512, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.cat([torch.full((1,), -100), torch.randint(0, 512, (1000,), generator=g)])[None]
    size = logits.numel() * 2
    ours = saved_bytes(lambda: lm_loss(logits, labels))
    plain = saved_bytes(lambda: F.cross_entropy(logits.float(), labels[0, 1:], reduction="sum"))
    assert plain >= 2 * size
    assert size <= ours <= size + 1000 * (4 + 8) + 8192


def _head_case(device, v=13, d=6):
    """Hidden states at the 27 scored positions of `_lm_batch`'s labels, a head (V, d) and the labels."""
    from rlhf_core.ops.logprobs import scored_mask

    g = _gen(11)
    _, labels = _lm_batch()
    n = int(scored_mask(labels).sum())
    return (torch.randn(n, d, generator=g).to(device), (torch.randn(v, d, generator=g) * 2).to(device),
            labels.to(device))


def _head_run(loss_fn, hidden, weight, labels, scale=1.0, **kw):
    """(loss, d loss / d hidden, d loss / d weight) of `loss_fn`'s loss times `scale`."""
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(weight.requires_grad)
    loss, metrics = loss_fn(h, w, labels, **kw)
    (loss * scale).backward()
    return loss.detach(), metrics, h.grad, w.grad


def _unfused(h, w, labels, **kw):
    return lm_loss(F.linear(h, w), labels, **kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("num_items", [7, None])
def test_lm_head_loss_is_lm_loss_of_the_heads_logits_bit_for_bit_in_one_chunk(device, precision, num_items):
    """Lever (memory): the LM head's product inside the loss (`lm_head_loss`) against the head's
    logits through `lm_loss`, on the 27 scored positions of `_lm_batch` (prompt and -100 labels
    among them), in float32 and under bf16 autocast (float32 weights and hidden states, cast as
    `F.linear` is): the same loss, metrics and gradients for the hidden states and the head, bit
    for bit, while all positions fit in one chunk; on CUDA (the GPU tests of
    `benchmarks/gpu/run.sh`) as on the CPU."""
    hidden, weight, labels = _head_case(device)
    weight.requires_grad_(True)
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
        ours = _head_run(lm_head_loss, hidden, weight, labels, num_items=num_items)
        plain = _head_run(_unfused, hidden, weight, labels, num_items=num_items)
    assert torch.equal(ours[0], plain[0]) and ours[1].keys() == plain[1].keys()
    assert all(torch.equal(ours[1][k], plain[1][k]) for k in plain[1])
    for got, want in zip(ours[2:], plain[2:]):
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert want.abs().max() > 0.01  # a gradient that is there to compare


def test_lm_head_loss_in_chunks_scaled_or_frozen_gives_the_logits_gradients(monkeypatch):
    """Chunks of 4 positions (27 scored: the last chunk ragged): the same loss to float rounding of
    its sum and the same gradients up to the order the chunks' head gradients are summed; a
    scaled loss (x 3, as a gradient scaler or a loss coefficient gives) scales them; a frozen head
    (LoRA) gets none and the hidden states theirs; without a graph only the value."""
    from rlhf_core.ops import losses

    hidden, weight, labels = _head_case("cpu")
    monkeypatch.setattr(losses, "HEAD_CHUNK_BYTES", 4 * 4 * 13)
    weight.requires_grad_(True)
    for scale in (1.0, 3.0):
        ours = _head_run(lm_head_loss, hidden, weight, labels, scale, num_items=7)
        plain = _head_run(_unfused, hidden, weight, labels, scale, num_items=7)
        torch.testing.assert_close(ours[0], plain[0], rtol=1e-6, atol=0)
        for got, want in zip(ours[2:], plain[2:]):
            assert want is not None and want.abs().max() > 0.01
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    weight.requires_grad_(False)
    ours, plain = (_head_run(fn, hidden, weight, labels, num_items=7) for fn in (lm_head_loss, _unfused))
    assert ours[3] is None and plain[3] is None
    torch.testing.assert_close(ours[2], plain[2], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(lm_head_loss(hidden, weight, labels, 7)[0], ours[0])


def test_lm_head_loss_under_fp16_autocast_is_the_plain_path_for_the_gradient_scaler():
    """Under float16 autocast (mixed precision "fp16", whose gradient scaler multiplies the loss's
    gradient by up to 2^16 only in the backward) the fused gradients would be made for the
    unscaled loss and underflow in float16 (99% of this case's logit gradients flush to zero
    unscaled, 85% scaled by 2^16); the loss then takes the head's logits: with the loss scaled by
    2^16 the gradients equal the plain path's bit for bit."""
    g = _gen(3)
    hidden = torch.randn(40, 8, generator=g)
    weight = (torch.randn(3000, 8, generator=g) * 4).requires_grad_(True)
    labels = torch.randint(0, 3000, (1, 41), generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = _head_run(lm_head_loss, hidden, weight, labels, 2.0 ** 16, num_items=400)
        plain = _head_run(_unfused, hidden, weight, labels, 2.0 ** 16, num_items=400)
    assert torch.equal(ours[0], plain[0])
    for got, want in zip(ours[2:], plain[2:]):
        assert torch.equal(got, want) and (want != 0).float().mean() > 0.5


def test_lm_head_loss_with_no_trained_position_is_zero_with_zero_gradients():
    """A micro-batch whose labels are all -100: no position is projected, the loss is 0 and the
    head still gets a (V, d) gradient of zeros, as the plain path gives it."""
    hidden, weight = torch.zeros(0, 4), torch.randn(7, 4).requires_grad_(True)
    labels = torch.full((1, 3), -100)
    for fn in (lm_head_loss, _unfused):
        loss, metrics, _, w_grad = _head_run(fn, hidden, weight, labels)
        assert float(loss) == 0.0 and int(metrics["tokens"]) == 0
        assert w_grad.shape == (7, 4) and not w_grad.any()


def test_lm_head_loss_keeps_no_logits_for_the_backward():
    """What the fused loss's graph keeps: the gradients for the hidden states (N, d) and the head
    (V, d), not the (N, V) logits that `lm_loss` on the head's output keeps (N = 1000 positions,
    V = 512, d = 16)."""
    g = _gen(5)
    hidden = torch.randn(1000, 16, generator=g).requires_grad_(True)
    weight = torch.randn(512, 16, generator=g).requires_grad_(True)
    labels = torch.cat([torch.full((1,), -100), torch.randint(0, 512, (1000,), generator=g)])[None]
    ours = saved_bytes(lambda: lm_head_loss(hidden, weight, labels))
    plain = saved_bytes(lambda: lm_loss(F.linear(hidden, weight), labels))
    assert plain >= 1000 * 512 * 4
    assert ours <= (1000 + 512) * 16 * 4 + 8192


def test_lm_loss_uniform_logits_is_log_vocab():
    labels = torch.tensor([[-100, 1, 2, -100]])
    loss, metrics = lm_loss(torch.zeros(1, 4, 5), labels)
    assert loss.item() == pytest.approx(math.log(5), abs=1e-6)
    assert int(metrics["tokens"]) == 2


def test_lm_loss_accumulation_invariance():
    logits, labels = _lm_batch()
    full, _ = lm_loss(logits, labels)
    total = int((labels[:, 1:] != -100).sum())
    accumulated = sum(lm_loss(logits[i : i + 1], labels[i : i + 1], num_items=total)[0] for i in range(8))
    assert accumulated.item() == pytest.approx(full.item(), rel=1e-6)
    as_tensor = sum(
        lm_loss(logits[i : i + 1], labels[i : i + 1], num_items=torch.tensor(total))[0] for i in range(8)
    )
    assert as_tensor.item() == pytest.approx(full.item(), rel=1e-6)
    # the naive average of per-micro-batch means is different here, so the test can fail
    naive = sum(lm_loss(logits[i : i + 1], labels[i : i + 1])[0] for i in range(8)) / 8
    assert abs(naive.item() - full.item()) > 1e-3


# ----------------------------------------------------------------------------------- reward model


def test_reward_pair_loss_by_hand():
    r_c = torch.tensor([2.0, 0.0])
    r_r = torch.tensor([1.0, 1.0])
    margin = torch.tensor([1.0, 0.0])
    loss, m = reward_pair_loss(r_c, r_r, margin=margin, center_coef=0.01)
    # pair 1: -log sigmoid(2 - 1 - 1) = ln 2; pair 2: -log sigmoid(-1) = ln(1 + e)
    # centering: 0.01 * mean(3^2, 1^2) = 0.05
    want = (LN2 + math.log(1 + math.e)) / 2 + 0.05
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == 0.0
    assert m["reward_chosen"].item() == 1.0 and m["reward_rejected"].item() == 1.0
    assert m["loss"].item() == pytest.approx(want, abs=1e-6)


def test_reward_pair_loss_weights_make_ranking_one_unit():
    # prompt A ranks 3 responses -> 3 pairs of weight 1/3; prompt B has one pair of weight 1
    r_c = torch.tensor([1.0, 2.0, 0.5, -1.0])
    r_r = torch.tensor([0.0, 0.0, 0.5, 1.0])
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    loss, _ = reward_pair_loss(r_c, r_r, weights=w)
    per = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0, 2.0, 0.0, -2.0)]
    want = (sum(per[:3]) / 3 + per[3]) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    unweighted, _ = reward_pair_loss(r_c, r_r)
    assert unweighted.item() == pytest.approx(sum(per) / 4, abs=1e-6)


# ----------------------------------------------------------------------------------- DPO / IPO


def _logps(seed, b=4):
    g = _gen(seed)
    return [torch.randn(b, generator=g) * 5 - 20 for _ in range(4)]


def test_dpo_is_ln2_when_policy_equals_reference():
    pc, pr, _, _ = _logps(1)
    loss, m = dpo_sigmoid_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    assert m["rewards/accuracies"].item() == 0.0
    assert m["rewards/margins"].item() == 0.0
    # label smoothing does not change the value at h = 0
    smoothed, _ = dpo_sigmoid_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(LN2, abs=1e-6)


def test_dpo_hand_case():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-3 + 5) - (-4 + 5) = 1; beta = 0.5
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -4.0, -5.0, -5.0))
    loss, m = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.4740769841801067, abs=1e-6)  # -log sigmoid(0.5)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.5)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -3.0 and m["logps/rejected"].item() == -4.0
    # cDPO: -log sigmoid(-x) = -log sigmoid(x) + x, so eps = 0.1 adds 0.1 * 0.5
    smoothed, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.4740769841801067 + 0.05, abs=1e-6)


def test_ipo_hand_case():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -4.0, -5.0, -5.0))  # h = 1
    assert ipo_loss(pc, pr, rc, rr, beta=0.5)[0].item() == pytest.approx(0.0, abs=1e-7)
    assert ipo_loss(pc, pr, rc, rr, beta=0.25)[0].item() == pytest.approx(1.0, abs=1e-6)
    assert ipo_loss(pc, pr, rc, rr, beta=1.0)[0].item() == pytest.approx(0.25, abs=1e-6)


def test_dpo_dispatch():
    args = _logps(2)
    torch.testing.assert_close(dpo_loss(*args, beta=0.1)[0], dpo_sigmoid_loss(*args, beta=0.1)[0])
    torch.testing.assert_close(
        dpo_loss(*args, beta=0.1, loss_type="sigmoid", label_smoothing=0.3)[0],
        dpo_sigmoid_loss(*args, beta=0.1, label_smoothing=0.3)[0],
    )
    torch.testing.assert_close(dpo_loss(*args, beta=0.1, loss_type="ipo")[0], ipo_loss(*args, beta=0.1)[0])
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, loss_type="hinge")


def test_dpo_metric_names():
    _, m = dpo_loss(*_logps(3), beta=0.1)
    assert set(m) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "loss",
    }
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


# ----------------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_clipping_by_hand():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.full((1, 6), -2.0)
    logprobs = (old + torch.log(ratio)).requires_grad_(True)
    loss, m = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=eps)
    # per token max(-A r, -A clip(r)):
    #  A=+1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped, positive advantage)
    #  A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped, negative advantage)
    #  A=+2, r=0.5: max(-1.0, -1.6) = -1.0  (unclipped: pessimistic side)
    #  A=-1, r=1.5: max( 1.5,  1.2) =  1.5  (unclipped)
    #  A=+1, r=1.1: -1.1 (inside the trust region); last token masked out
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.0 + 1.5 - 1.1) / 5, abs=1e-6)
    assert m["policy/clipfrac"].item() == pytest.approx(0.8)
    assert m["val/ratio"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5, abs=1e-6)
    logs = [math.log(r) for r in (1.5, 0.5, 0.5, 1.5, 1.1)]
    assert m["policy/approxkl"].item() == pytest.approx(0.5 * sum(x * x for x in logs) / 5, abs=1e-6)
    assert m["loss/policy"].item() == pytest.approx(loss.item())
    loss.backward()
    grad = logprobs.grad[0]
    # clipped tokens get no gradient; unclipped ones get -A * r / n
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0 and grad[5].item() == 0.0
    assert grad[2].item() == pytest.approx(-2.0 * 0.5 / 5, abs=1e-6)
    assert grad[3].item() == pytest.approx(1.0 * 1.5 / 5, abs=1e-6)


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 1.0, 0.0, 42.0]])
    old = torch.tensor([[0.5, 0.9, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 1: clip(1.0) -> 0.7: max((1-2)^2, (0.7-2)^2) = 1.69
    # token 2: inside the range: (1-0)^2 = 1
    # token 3: clip(0.0) -> 0.8: max((0-0.5)^2, (0.8-0.5)^2) = 0.25
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.25) / 3, abs=1e-6)
    assert m["value/clipfrac"].item() == pytest.approx(1 / 3)
    assert m["loss/value"].item() == pytest.approx(loss.item())


# ----------------------------------------------------------------------------------- TRL cross-checks


def _fake_trainer_self(**attrs):
    """A stand-in `self` with just what TRL's loss methods read (single process, train mode)."""
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    base = dict(
        model=types.SimpleNamespace(training=True),
        accelerator=accelerator,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    base.update(attrs)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_vs_trl(dtype):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = (torch.randn(3, 5, 19, generator=_gen(7)) * 4).to(dtype)
    index = torch.randint(0, 19, (3, 5), generator=_gen(8))
    ours = selective_log_softmax(logits, index)  # float32 always (TRL returns the input dtype)
    torch.testing.assert_close(ours.to(dtype), trl_utils.selective_log_softmax(logits, index))


def _trl_dpo(loss_type, beta, label_smoothing, pc, pr, rc, rr, completion_lengths=None):
    """Run trl 1.16 `DPOTrainer._compute_loss` on given sequence log-probs, via a fake model.

    The fake model returns per-token log-probs whose completion tokens sum to the given sequence
    log-probs. Returns (loss, TRL's recorded metrics).
    """
    dpo_mod = pytest.importorskip("trl.trainer.dpo_trainer")
    b = pc.shape[0]
    lengths = completion_lengths if completion_lengths is not None else [1] * (2 * b)
    t = 1 + max(lengths)  # one prompt token, then the completion (right padded)
    completion_mask = torch.zeros(2 * b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1 : 1 + n] = 1
    shift = completion_mask[:, 1:].float()
    seq = torch.cat([pc, pr])
    per_token = shift * (seq / shift.sum(1)).unsqueeze(1)  # spread each sum over its tokens

    def fake_model(**kwargs):
        z = torch.zeros(2 * b, t - 1)
        return types.SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    fake_self = _fake_trainer_self(
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
    )
    inputs = {
        "input_ids": torch.ones(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = dpo_mod.DPOTrainer._compute_loss(fake_self, fake_model, inputs, False)
    return loss, {k: v[-1] for k, v in fake_self._metrics["train"].items()}


def test_dpo_sigmoid_vs_trl():
    pc, pr, rc, rr = _logps(11, b=6)
    trl_loss, trl_m = _trl_dpo("sigmoid", 0.1, 0.0, pc, pr, rc, rr)
    loss, m = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert m[key].item() == pytest.approx(trl_m[key], rel=1e-5, abs=1e-6), key


def test_ipo_vs_trl_length_normalised():
    pc, pr, rc, rr = _logps(12, b=3)
    lengths = [1, 3, 2, 4, 1, 2]  # chosen 0..2, then rejected 0..2
    trl_loss, _ = _trl_dpo("ipo", 0.5, 0.0, pc, pr, rc, rr, completion_lengths=lengths)
    # TRL divides sequence log-probs by the completion length before IPO; do the same here
    n = torch.tensor(lengths, dtype=torch.float32)
    ours, _ = ipo_loss(pc / n[:3], pr / n[3:], rc / n[:3], rr / n[3:], beta=0.5)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    # with single-token completions the normalisation is the identity
    trl_unit, _ = _trl_dpo("ipo", 0.5, 0.0, pc, pr, rc, rr)
    assert ipo_loss(pc, pr, rc, rr, beta=0.5)[0].item() == pytest.approx(trl_unit.item(), rel=1e-5)


def test_label_smoothed_dpo_vs_trl_aot():
    # trl 1.16's "sigmoid" ignores label_smoothing; its "aot" loss applies the cDPO formula to
    # sorted log-ratio gaps. When the pairs are already in sorted order, aot == cDPO exactly.
    g = _gen(13)
    b = 5
    pr, rr = torch.randn(b, generator=g) - 10, torch.randn(b, generator=g) - 10
    pc = pr + torch.sort(torch.randn(b, generator=g) * 3).values
    rc = rr + torch.sort(torch.randn(b, generator=g) * 3).values
    trl_loss, _ = _trl_dpo("aot", 0.3, 0.15, pc, pr, rc, rr)
    ours, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.15)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    plain, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.3)
    assert abs(plain.item() - trl_loss.item()) > 1e-4  # smoothing really matters here


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)])
def test_reward_loss_vs_trl(with_margin, center):
    rm_mod = pytest.importorskip("trl.trainer.reward_trainer")
    g = _gen(14)
    b = 6
    r_c, r_r = torch.randn(b, generator=g) * 2, torch.randn(b, generator=g) * 2
    margin = torch.rand(b, generator=g) if with_margin else None

    def fake_model(**kwargs):
        return types.SimpleNamespace(logits=torch.cat([r_c, r_r]).unsqueeze(-1))

    fake_self = _fake_trainer_self(args=types.SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(2 * b, 3, dtype=torch.long), "attention_mask": torch.ones(2 * b, 3)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = rm_mod.RewardTrainer.compute_loss(fake_self, fake_model, inputs)
    loss, m = reward_pair_loss(r_c, r_r, margin=margin, center_coef=center or 0.0)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    trl_m = fake_self._metrics["train"]
    assert m["accuracy"].item() == pytest.approx(trl_m["accuracy"][-1])
    assert m["margin"].item() == pytest.approx(trl_m["margin"][-1], rel=1e-6)
