"""Parity of the speed levers that change how numbers are computed, against the straightforward
computation: each sequence run alone, unpadded, through the full (B, T, V) log-softmax.

- PPO reads log-probs, entropies and values only at the response positions of a left-padded
  prompt + right-padded response batch, and a padding-free rollout (rows end to end) gives the
  padded one's outputs and gradients, and a micro-batch padded to its own longest row gives its
  rows' losses and gradients at the rollout's full width;
- DPO's reference log-probs precomputed once (in batches of one composition) equal the ones
  computed at each step (in batches of another);
- the SFT loss of a right-padded batch equals the per-sequence losses summed over its tokens;
- a padding-free SFT batch (rows end to end, positions restarting) gives each row's logits as
  that row run alone, and the padded batch's loss and gradients;
- `PACKED_SDPA` attends such rows row by row and gives plain SDPA's block-mask outputs and
  gradients;
- padding-free RM and DPO pairs give each row's reward and response log-prob sum as the row run
  alone, and the padded pairs' losses and gradients;
- RM pairs with each prompt computed once (`rm.share_prompt`: the rejected response continues
  the prompt under a mask that hides the chosen one) give each reward as its row run alone, and
  the padded pairs' loss and gradients;
- logits projected only at the positions that predict a trained token (`scored_mask` as
  `logits_to_keep`) give the full-logits SFT loss, DPO sequence log-probs and their gradients;
- the last decoder layer run only at the kept positions (`last_layer_at`) gives the full
  layer's logits, scores and gradients, for Llama and Qwen2, every batch layout and LoRA;
- the fused AdamW kernel gives the per-tensor loop's weights and moments;
- a tied embedding's sparse lookup gradient, added into the LM head's, gives the dense gradient.
(Row-wise fp32 log-probs, entropy without graph and gradient checkpointing have their parity
tests in test_logprobs.py and test_modeling.py.)
"""
from __future__ import annotations

import functools

import pytest
import torch

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import LoraConfig, ModelConfig
from rlhf_core.data.batching import (collate_lm, collate_lm_packed, collate_pairs, collate_pairs_packed,
                                    collate_pairs_shared)
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.ops.logprobs import scored_mask, sequence_logprobs
from rlhf_core.ops.losses import lm_loss
from rlhf_core.stages.generation import Rollout
from rlhf_core.training.modeling import apply_lora, build_tiny_causal_lm, forward_logits, forward_packed_logits

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)
CORPUS = ["What is the capital of Veldoria? Certainly! The capital of Veldoria is Marrowick."] * 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, TINY.vocab_size)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_causal_lm(TINY, tok, seed=3).eval()


def ids(gen: torch.Generator, n: int, tok) -> list[int]:
    """n random non-special token ids."""
    return torch.randint(10, len(tok), (n,), generator=gen).tolist()


@torch.no_grad()
def alone_logprobs(model, seq: list[int], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward way: one unpadded sequence, full log_softmax over the vocabulary.
    Returns (log p(seq[t+1] | seq[:t+1]), entropy at t), each (len(seq) - 1,)."""
    logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


def make_rollout(prompts: list[list[int]], responses: list[list[int]], pad: int, eos: int) -> Rollout:
    """Prompts left-padded to P, responses (each ending in EOS) right-padded to R, as `sample` builds them."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    seqs, attn, rmask = [], [], []
    for p, r in zip(prompts, responses):
        seqs.append([pad] * (P - len(p)) + p + r + [pad] * (R - len(r)))
        attn.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)))
        rmask.append([1] * len(r) + [0] * (R - len(r)))
    return Rollout(torch.tensor(seqs), torch.tensor(attn), torch.tensor(rmask), P,
                   torch.tensor([r[-1] == eos for r in responses]))


def rows_of(rollout: Rollout, rows) -> Rollout:
    """The `rows` of `rollout` at the rollout's full width (the straightforward micro-batch)."""
    return Rollout(rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows],
                   rollout.prompt_length, rollout.has_eos[rows], None if rollout.logprobs is None else rollout.logprobs[rows])


def test_ppo_response_logprobs_and_entropy_equal_each_sequence_run_alone(model, tok):
    from rlhf_core.stages.ppo import response_logprobs

    gen = torch.Generator().manual_seed(0)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [ids(gen, n, tok) for n in (3, 7, 5)]
    responses = [ids(gen, n, tok) + [eos] for n in (4, 1, 6)]
    rollout = make_rollout(prompts, responses, pad, eos)
    temperature = 0.7
    with torch.no_grad():
        lp, ent = response_logprobs(model, rollout, temperature)
        lp_rows, _ = response_logprobs(model, rows_of(rollout, torch.tensor([2, 0])), temperature)
    assert lp.shape == rollout.response_mask.shape and lp.dtype == torch.float32
    for b, (p, r) in enumerate(zip(prompts, responses)):
        want_lp, want_ent = alone_logprobs(model, p + r, temperature)
        n = len(r)  # the response tokens are the last n targets of the unpadded sequence
        torch.testing.assert_close(lp[b, :n].double(), want_lp[-n:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[b, :n].double(), want_ent[-n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_rows, lp[[2, 0]])


def tiny_critic(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_packed_rollout_gives_the_padded_outputs_and_gradients(tok, lora):
    """`ppo.padding_free`: a rollout's rows end to end (prompt without its left padding, response
    up to its EOS, positions restarting) give the padded rollout's response log-probs, entropies,
    values and rewards wherever the response mask is 1 (zeros after EOS), for all rows or a
    micro-batch of them, and the same gradients through actor and critic. Positions that do not
    restart let a row attend to the one before it and change the outputs."""
    from rlhf_core.stages.ppo import pack_rollout, response_logprobs, response_values, reward_scores

    gen = torch.Generator().manual_seed(4)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [ids(gen, n, tok) for n in (3, 7, 5)]
    responses = [ids(gen, n, tok) + [eos] for n in (4, 1, 6)]  # R = 7: rows 0 and 1 end early
    rollout = make_rollout(prompts, responses, pad, eos)
    mask = rollout.response_mask.bool()

    packed = pack_rollout(rollout)  # the layout by hand
    assert packed.input_ids[0].tolist() == [t for p, r in zip(prompts, responses) for t in p + r]
    assert packed.position_ids[0].tolist() == [i for p, r in zip(prompts, responses) for i in range(len(p + r))]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    starts = [sum(lengths[:i]) for i in range(3)]
    assert packed.ends.tolist() == [s + n - 1 for s, n in zip(starts, lengths)]
    want = [s + len(p) - 1 + j for s, p, r in zip(starts, prompts, responses) for j in range(len(r))]
    assert packed.scored[0].nonzero().flatten().tolist() == want

    runs = []
    for layout in ("padded", "packed"):
        actor = fresh_model(tok, lora=lora)
        critic = tiny_critic(tok)
        pk = pack_rollout(rollout) if layout == "packed" else None
        lp, ent = response_logprobs(actor, rollout, 0.7, packed=pk)
        values = response_values(critic, rollout, packed=pk)
        with torch.no_grad():
            rewards = reward_scores(critic, rollout, pk)
            rows = torch.tensor([2, 0])
            pick = rows_of(rollout, rows)
            lp_rows, _ = response_logprobs(actor, pick, 0.7, pack_rollout(pick) if pk else None)
        ((lp * mask).sum() + (values * mask).square().sum()).backward()
        grads = {n: q.grad.clone() for n, q in [*actor.named_parameters(), *critic.named_parameters()]
                 if q.grad is not None}
        runs.append((lp.detach(), ent, values.detach(), rewards, lp_rows, grads))
    (lp, ent, values, rewards, lp_rows, grads), (lp_p, ent_p, values_p, rewards_p, lp_rows_p, grads_p) = runs
    for padded, packed_out in ((lp, lp_p), (ent, ent_p), (values, values_p), (lp_rows, lp_rows_p)):
        m = mask if padded.shape[0] == 3 else mask[[2, 0]]
        torch.testing.assert_close(packed_out[m], padded[m], atol=1e-5, rtol=1e-5)
        assert packed_out[~m].eq(0).all()
    torch.testing.assert_close(rewards_p, rewards, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(grads_p) > 4
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)

    leaky = packed._replace(position_ids=torch.arange(packed.input_ids.shape[1])[None])
    with torch.no_grad():
        a = response_logprobs(fresh_model(tok, lora=lora), rollout, 0.7, packed=leaky)[0]
    assert not torch.allclose(a[1:][mask[1:]], lp[1:][mask[1:]], atol=1e-3)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ppo_micro_batch_padded_to_its_longest_row_gives_the_full_width_losses_and_gradients(tok, layout):
    """`micro_rollout`: a micro-batch's rows without the columns that are padding in all of them
    (the left padding their longest prompt does not need, the response slots after all of their
    EOS). The layout by hand, then `ppo_update`'s losses, metrics and gradients against the same
    rows computed at the rollout's full width."""
    from rlhf_core.config import PPOConfig
    from rlhf_core.ops.losses import ppo_policy_loss, ppo_value_loss
    from rlhf_core.ops.masked import masked_mean
    from rlhf_core.stages.ppo import Experience, micro_rollout, ppo_update, response_logprobs, response_values

    gen = torch.Generator().manual_seed(5)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [ids(gen, n, tok) for n in (3, 7, 5, 2)]
    responses = [ids(gen, n, tok) + [eos] for n in (4, 1, 6, 2)]  # P = 7, R = 7
    rollout = make_rollout(prompts, responses, pad, eos)._replace(logprobs=torch.randn(4, 7, generator=gen))

    cut = {(0, 3): (4, 5), (3, 0): (4, 5), (2, 0): (2, 7), (0, 1): (0, 5), (1,): (0, 2), (3,): (5, 3)}
    for rows, (lead, R) in cut.items():  # (columns cut on the left, response width kept)
        r = micro_rollout(rollout, torch.tensor(rows))
        assert r.prompt_length == 7 - lead and r.response_mask.shape == (len(rows), R)
        torch.testing.assert_close(r.sequences, rollout.sequences[list(rows)][:, lead:7 + R])
        torch.testing.assert_close(r.attention_mask, rollout.attention_mask[list(rows)][:, lead:7 + R])
        torch.testing.assert_close(r.logprobs, rollout.logprobs[list(rows)][:, :R])
        assert r.response_mask.sum() == rollout.response_mask[list(rows)].sum()  # no response token cut
        assert r.attention_mask.sum() == rollout.attention_mask[list(rows)].sum()  # nor any real token

    mask = rollout.response_mask
    exp = Experience(rollout, *(torch.randn(4, 7, generator=gen) * mask for _ in range(5)), torch.randn(4),
                     torch.zeros(4, 7))
    cfg = PPOConfig(temperature=0.7, padding_free=layout == "packed")
    rows = torch.tensor([0, 3])  # 4 columns of left padding and 2 response slots are cut
    runs = []
    for trimmed in (True, False):
        actor, critic = fresh_model(tok, lora=False), tiny_critic(tok)
        if trimmed:
            a_loss, c_loss, m = ppo_update(exp, rows, actor, critic, cfg)
        else:  # the same rows at the rollout's full width, the straightforward way
            mb = mask[rows]
            lp, ent = response_logprobs(actor, rows_of(rollout, rows), cfg.temperature)
            a_loss, m = ppo_policy_loss(lp, exp.old_logprobs[rows], exp.advantages[rows], mb, cfg.clip_eps)
            c_loss, vm = ppo_value_loss(response_values(critic, rows_of(rollout, rows)), exp.old_values[rows],
                                        exp.returns[rows], mb, cfg.value_clip_eps)
            m.update(vm)
            m["objective/entropy"] = masked_mean(ent, mb)
        (a_loss + c_loss).backward()
        grads = {n: q.grad.clone() for n, q in [*actor.named_parameters(), *critic.named_parameters()]}
        runs.append((a_loss.detach(), c_loss.detach(), m, grads))
    (a, c, m, g), (a_full, c_full, m_full, g_full) = runs
    torch.testing.assert_close(a, a_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_full, atol=1e-5, rtol=1e-5)
    assert m.keys() == m_full.keys()
    for k in m:
        torch.testing.assert_close(m[k], m_full[k], atol=1e-5, rtol=1e-5, msg=k)
    assert len(g) == len(g_full) > 4
    for name in g:
        torch.testing.assert_close(g[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_ppo_first_micro_batch_values_keep_their_graph_and_equal_the_plain_values(tok, layout):
    """`rollout_values(first=rows)`: every row's values as one forward of the whole rollout gives
    them, and the first micro-batch's with a graph whose gradient is the one a fresh forward of
    those rows (as `ppo_update` would run it) gives."""
    from rlhf_core.stages.ppo import micro_rollout, pack_rollout, response_values, rollout_values

    gen = torch.Generator().manual_seed(6)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rollout = make_rollout([ids(gen, n, tok) for n in (3, 7, 5, 2)],
                           [ids(gen, n, tok) + [eos] for n in (4, 1, 6, 2)], pad, eos)
    mask = rollout.response_mask
    packed = pack_rollout(rollout) if layout == "packed" else None
    first = torch.tensor([3, 0])
    critic = tiny_critic(tok)
    plain, none = rollout_values(critic, rollout, packed)
    values, live = rollout_values(critic, rollout, packed, first)
    assert none is None and not plain.requires_grad and not values.requires_grad
    torch.testing.assert_close(values, plain, atol=1e-5, rtol=1e-5)
    assert values[~mask.bool()].eq(0).all()
    r = micro_rollout(rollout, first)
    assert live.requires_grad and live.shape == r.response_mask.shape == (2, 5)
    torch.testing.assert_close(live.detach() * r.response_mask, values[first, :5])
    (live * r.response_mask).square().sum().backward()
    got = {n: q.grad.clone() for n, q in critic.named_parameters()}
    critic.zero_grad()
    fresh = response_values(critic, r, packed=pack_rollout(r) if packed is not None else None)
    (fresh * r.response_mask).square().sum().backward()
    for n, q in critic.named_parameters():
        torch.testing.assert_close(got[n], q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_ppo_response_values_equal_each_sequence_scored_alone(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_core.stages.ppo import response_values

    torch.manual_seed(0)
    critic = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1)).eval()
    gen = torch.Generator().manual_seed(1)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [ids(gen, n, tok) for n in (2, 6)]
    responses = [ids(gen, n, tok) + [eos] for n in (5, 2)]
    rollout = make_rollout(prompts, responses, pad, eos)
    with torch.no_grad():
        values = response_values(critic, rollout)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            hidden = critic.model(input_ids=torch.tensor([p + r])).last_hidden_state
            alone = critic.score(hidden)[0, :, 0]
            # the value of response token j is read at the token before it
            torch.testing.assert_close(values[b, :len(r)], alone[len(p) - 1:len(p) - 1 + len(r)], atol=1e-5, rtol=1e-5)


def pair_rows(tok, n: int, seed: int):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n, 3), generator=gen).tolist()
    return Dataset.from_dict({"prompt_ids": [ids(gen, a, tok) for a, _, _ in lengths],
                              "chosen_ids": [ids(gen, c, tok) + [tok.eos_token_id] for _, c, _ in lengths],
                              "rejected_ids": [ids(gen, r, tok) + [tok.eos_token_id] for _, _, r in lengths]})


def test_precomputed_dpo_reference_equals_the_per_step_reference_and_each_pair_alone(model, tok):
    from rlhf_core.stages.dpo import precompute_reference, reference_logprobs
    from rlhf_core.training.frozen import reference

    policy = apply_lora(build_tiny_causal_lm(TINY, tok, seed=3), LoraConfig(enabled=True, r=4, alpha=8)).eval()
    ds = pair_rows(tok, 7, seed=2)
    ref = reference(policy, None, "cpu")  # LoRA: the reference is the policy without adapters, nothing loaded
    table = precompute_reference(ref, ds, tok.pad_token_id, 4, "cpu")  # batches [0..3], [4..6]
    assert table.shape == (7, 2)
    per_step = [[6, 1, 3], [0, 5], [2, 4]]  # other batch compositions, so other padding widths
    for rows in per_step:
        c, r = reference_logprobs(ref, collate_pairs(ds[rows], tok.pad_token_id), "cpu")
        torch.testing.assert_close(torch.stack([c, r], -1), table[rows], atol=1e-5, rtol=1e-5)
    for i in range(len(ds)):  # and the straightforward sum over the response tokens of the base model, alone
        p = ds[i]["prompt_ids"]
        for k, key in enumerate(("chosen_ids", "rejected_ids")):
            resp = ds[i][key]
            lp, _ = alone_logprobs(model, p + resp)
            assert abs(float(table[i, k]) - float(lp[-len(resp):].sum())) < 1e-4


def test_reference_precomputed_for_the_rows_a_run_draws_equals_the_full_table_bit_for_bit(tok):
    """A run shorter than an epoch scores only the chunks holding its rows, the same fixed chunks
    as the full table: they get identical values (a resumed run, asking for fewer, too), and the
    chunks holding none of them are never run and stay NaN."""
    from rlhf_core.stages.dpo import precompute_reference
    from rlhf_core.training.frozen import reference

    ds = pair_rows(tok, 11, seed=4)
    scored = []

    class Counting(torch.nn.Module):  # the tiny model, recording how many rows each forward scores
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            scored.append(input_ids.shape[0])
            return self.inner(input_ids=input_ids, **kw)

    model = Counting(build_tiny_causal_lm(TINY, tok, seed=5)).eval()
    ref = reference(model, lambda: model, "cpu")  # no LoRA: the frozen copy is what `load` gives
    full = precompute_reference(ref, ds, tok.pad_token_id, 4, "cpu")  # chunks [0..3], [4..7], [8..10]
    scored.clear()
    part = precompute_reference(ref, ds, tok.pad_token_id, 4, "cpu", rows=[9, 2, 10])
    assert sum(scored) == 2 * (4 + 3), "chunks [0..3] and [8..10] only, chosen and rejected"
    scored_rows = [0, 1, 2, 3, 8, 9, 10]  # the rows asked for, and the others in their chunks
    assert torch.equal(part[scored_rows], full[scored_rows]) and not full.isnan().any()
    assert part[4:8].isnan().all()


def test_sft_loss_of_a_padded_batch_equals_the_per_sequence_sums(model, tok):
    gen = torch.Generator().manual_seed(4)
    seqs = [ids(gen, n, tok) for n in (9, 3, 6)]
    labels = [[IGNORE_INDEX] * 2 + s[2:] for s in seqs]  # a masked prompt of 2 tokens
    b = collate_lm({"input_ids": seqs, "labels": labels}, tok.pad_token_id)
    with torch.no_grad():
        loss, m = lm_loss(forward_logits(model, b.input_ids, b.attention_mask), b.labels)
    total, count = 0.0, 0
    for s in seqs:
        lp, _ = alone_logprobs(model, s)
        total, count = total - float(lp[1:].sum()), count + len(s) - 2  # targets 2.. are trained
    assert int(m["tokens"]) == count
    assert abs(float(loss) - total / count) < 1e-5


PROMPTS = (2, 1, 5)  # masked prompt tokens of the three chats below: 7 + 2 + 9 = 18 trained tokens


def three_chats(tok, seed: int) -> dict:
    """Three chats of 9, 3 and 14 random tokens whose first `PROMPTS` tokens are masked."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [ids(gen, n, tok) for n in (9, 3, 14)]
    return {"input_ids": seqs, "labels": [[IGNORE_INDEX] * k + s[k:] for s, k in zip(seqs, PROMPTS)]}


def fresh_model(tok, lora: bool):
    """The tiny model at seed 3, with LoRA on q/v when asked (its B starts at zero)."""
    m = build_tiny_causal_lm(TINY, tok, seed=3)
    return apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj"))) if lora else m


def test_a_packed_batch_is_laid_out_end_to_end_with_restarting_positions():
    """Hand-built: rows [5 6 7] and [8 9] with their first token masked as a prompt would be, and
    a PT-style row whose first token is a label: no target crosses from one row into the next."""
    b = collate_lm_packed({"input_ids": [[5, 6, 7], [8, 9], [3, 4]],
                           "labels": [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9], [3, 4]]})
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert b.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, 4]]


def test_packed_logits_of_each_row_equal_the_row_run_alone(model, tok):
    """Attention stays inside each row: a leak from the row before would change these logits."""
    gen = torch.Generator().manual_seed(5)
    seqs = [ids(gen, n, tok) for n in (7, 4, 11)]
    b = collate_lm_packed({"input_ids": seqs})
    with torch.no_grad():
        packed = forward_packed_logits(model, b.input_ids, b.position_ids)[0]
        start = 0
        for s in seqs:
            alone = model(input_ids=torch.tensor([s])).logits[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-5, rtol=1e-5)
            start += len(s)
        # the check can fail: the same rows packed without restarting positions see each other
        leaky = model(input_ids=b.input_ids).logits[0, len(seqs[0]):len(seqs[0]) + len(seqs[1])]
        assert (leaky - model(input_ids=torch.tensor([seqs[1]])).logits[0]).abs().max() > 1e-3


class SDPACalls:
    """Records each scaled_dot_product_attention call as (query length, is_causal, has a mask)."""

    def __init__(self, monkeypatch):
        self.calls, real = [], torch.nn.functional.scaled_dot_product_attention

        def record(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
            self.calls.append((query.shape[2], is_causal, attn_mask is not None))
            return real(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)


@pytest.mark.parametrize("kind", ["lm", "lm-lora", "scores"])
def test_packed_sdpa_attends_row_by_row_to_sdpas_block_mask_outputs_and_gradients(tok, kind, monkeypatch):
    """`PACKED_SDPA` (`use_packed_sdpa`): rows end to end attend row by row, one causal SDPA call
    per row and layer with no mask, and give plain SDPA's outputs over the whole block-diagonal
    mask, and its gradients: LM logits (full and LoRA) and a scalar model's per-token scores."""
    from rlhf_core.training.modeling import PACKED_SDPA

    gen = torch.Generator().manual_seed(8)
    lengths = (6, 3, 9, 1)
    b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in lengths]})
    calls = SDPACalls(monkeypatch)
    runs = []
    for attn in (PACKED_SDPA, "sdpa"):
        m = packed_model(tok, kind)
        assert m.config._attn_implementation == PACKED_SDPA
        m.set_attn_implementation(attn)
        calls.calls.clear()
        runs.append((*packed_outputs_and_grads(m, kind, b), list(calls.calls)))
    (out, grads, row_calls), (want, want_grads, mask_calls) = runs
    layers = 2
    assert row_calls == [(n, n > 1, False) for _ in range(layers) for n in lengths]  # one token: nothing to mask
    assert mask_calls == [(sum(lengths), False, True)] * layers
    assert_same_outputs_and_grads((out, grads), (want, want_grads), atol=1e-5)


@pytest.mark.parametrize("kind", ["lm", "scores"])
def test_rows_end_to_end_on_packed_sdpa_build_no_block_mask(tok, kind, monkeypatch):
    """`packed_inputs`: a forward of rows end to end on `PACKED_SDPA` hands its attention no mask
    (transformers would otherwise build the (N, N) block-diagonal one at every forward, which
    `PACKED_SDPA` never reads, attending by the rows' bounds), while on plain SDPA, which does
    read it, the block mask is still built; the outputs agree (the test above)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf_core.training import modeling

    gen = torch.Generator().manual_seed(8)
    b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in (6, 3, 9)]})
    masks = []
    packed = modeling._packed_sdpa

    def spy(real):
        return lambda module, q, k, v, mask, **kw: masks.append(None if mask is None else tuple(mask.shape)) or real(
            module, q, k, v, mask, **kw)

    for attn, want in ((modeling.PACKED_SDPA, None), ("sdpa", (1, 1, 18, 18))):
        m = packed_model(tok, kind)  # registers `PACKED_SDPA` again: spy on it after
        m.set_attn_implementation(attn)
        monkeypatch.setitem(AttentionInterface._global_mapping, modeling.PACKED_SDPA, spy(packed))
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy(sdpa_attention_forward))
        masks.clear()
        with torch.no_grad():
            if kind == "scores":
                modeling.token_scores(m, b.input_ids, None, b.position_ids)
            else:
                modeling.forward_packed_logits(m, b.input_ids, b.position_ids)
        assert masks == [want, want], attn  # two layers


def test_packed_sdpa_keeps_a_sliding_window_within_each_row():
    """A sliding-window model (Mistral's layers, window 4) on `PACKED_SDPA`: rows end to end of 6,
    3 and 9 tokens give the logits of each row run alone on plain SDPA, whose mask carries the
    window; attending each row only causally (as before 2026-12-07 evening) moved them by 0.1."""
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf_core.training.modeling import PACKED_SDPA, forward_packed_logits, use_packed_sdpa

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         sliding_window=4, pad_token_id=0, attn_implementation="sdpa"))
    m = use_packed_sdpa(m).eval()
    assert m.config._attn_implementation == PACKED_SDPA
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 100, (n,), generator=g) for n in (6, 3, 9)]
    with torch.no_grad():
        packed = forward_packed_logits(m, torch.cat(rows)[None], torch.cat([torch.arange(len(r)) for r in rows])[None])
        m.set_attn_implementation("sdpa")
        alone = torch.cat([m(input_ids=r[None]).logits[0] for r in rows])
    torch.testing.assert_close(packed[0], alone, atol=1e-5, rtol=1e-5)


def packed_model(tok, kind: str):
    """A fresh tiny model on `PACKED_SDPA`: an LM (`lm`, `lm-lora`: two heads) or a one-label
    scalar model with grouped-query attention (`scores`: four query heads on two key-value heads)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_core.training.modeling import use_packed_sdpa

    if kind != "scores":
        return fresh_model(tok, lora=kind == "lm-lora")
    torch.manual_seed(2)
    return use_packed_sdpa(LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1)))


def outputs_and_grads(m, run) -> tuple[torch.Tensor, dict]:
    """`run(m)`'s output, and every trainable gradient of a loss that reads all of it."""
    m.zero_grad(set_to_none=True)
    out = run(m)
    out.float().sin().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def packed_outputs_and_grads(m, kind: str, b) -> tuple[torch.Tensor, dict]:
    """Logits (LM) or per-token scores of the rows end to end in `b`, and every trainable
    gradient of a loss that reads all of them."""
    from rlhf_core.training.modeling import token_scores

    if kind == "scores":
        return outputs_and_grads(m, lambda m: token_scores(m, b.input_ids, None, b.position_ids))
    return outputs_and_grads(m, lambda m: forward_packed_logits(m, b.input_ids, b.position_ids))


def assert_same_outputs_and_grads(got, want, atol: float, rtol: float = 1e-4) -> None:
    (out, grads), (want_out, want_grads) = got, want
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol)
    assert grads.keys() == want_grads.keys() and len(grads) > 2
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=atol, rtol=rtol, msg=name)


def block_causal_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                           enable_gqa=False):
    """What torch's `varlen_attn` computes, written out for the CPU: (N, H, D) queries, (N, H_kv, D)
    keys and values, each query attending to the keys of its own row (`cu_q` int32 offsets) up to
    itself (`window_size` (-1, 0)), through one softmax over the whole (N, N) score matrix with every
    other key masked out. Checks the arguments a causal self-attention call must pass."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int(cu_q.diff().max())
    assert enable_gqa == (q.shape[1] != k.shape[1])
    n, heads, dim = q.shape
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    row = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff().long())
    pos = torch.arange(n)
    allowed = (row[:, None] == row[None, :]) & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) * (dim ** -0.5 if scale is None else scale)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


@pytest.mark.parametrize("kind", ["lm", "lm-lora", "scores"])
def test_packed_sdpa_through_a_varlen_kernel_gives_the_row_by_row_outputs_and_gradients(tok, kind, monkeypatch):
    """Where the device has a varlen flash-attention kernel (`varlen_kernel`: CUDA, fp16/bf16),
    `PACKED_SDPA` hands it all rows at once (`varlen_rows`). The kernel needs a GPU, so here it is
    `block_causal_attention`, which computes what torch documents for it: the layouts and
    arguments around the call must give the row-by-row path's logits, scores and gradients, with
    one kernel call per layer and no SDPA call. (`test_packed_sdpa_on_cuda_...` runs torch's own
    kernel where a GPU is present.)"""
    from rlhf_core.training import modeling

    gen = torch.Generator().manual_seed(8)
    b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in (6, 3, 9, 1)]})
    want = packed_outputs_and_grads(packed_model(tok, kind), kind, b)
    kernel_calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        kernel_calls.append(q.shape)
        return kernel_2_12(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                           enable_gqa=enable_gqa)
    monkeypatch.setattr(modeling, "varlen_kernel", lambda query, kwargs: kernel)
    sdpa = SDPACalls(monkeypatch)
    got = packed_outputs_and_grads(packed_model(tok, kind), kind, b)
    heads = 4 if kind == "scores" else TINY.num_heads
    assert kernel_calls == [(19, heads, TINY.hidden_size // heads)] * 2  # (N, H, D), once per layer
    assert sdpa.calls == []
    assert_same_outputs_and_grads(got, want, atol=1e-5)
    # the check can fail: keys in the wrong layout (heads taken for positions) change the outputs
    monkeypatch.setattr(modeling, "varlen_rows", lambda kern, q, k, v, cu, longest, scaling: kern(
        q[0].transpose(0, 1), k[0].reshape(k.shape[2], k.shape[1], -1), v[0].transpose(0, 1), cu, cu, longest,
        longest, scale=scaling, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])[None])
    wrong, _ = packed_outputs_and_grads(packed_model(tok, kind), kind, b)
    assert (wrong - want[0]).abs().max() > 1e-4  # 10x the parity tolerance


def kernel_2_12(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return block_causal_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                  enable_gqa=enable_gqa)


def kernel_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    assert q.shape[1] == k.shape[1], "no grouped-query attention in this signature"
    return block_causal_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


def kernel_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and q.shape[1] == k.shape[1]
    return block_causal_attention(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [kernel_2_12, kernel_2_11, kernel_2_10])
@pytest.mark.parametrize("scaling", [None, 8 ** -0.5, 0.3])
def test_varlen_rows_fits_each_signature_torch_gave_the_kernel(kernel, scaling):
    """torch's `varlen_attn` took `scale`, `window_size` and `enable_gqa` from 2.12, `scale` and
    `window_size` before, and only `is_causal` at first (stand-ins with exactly those arguments):
    `varlen_rows` gives each row's causal SDPA, with four query heads on two key-value heads and a
    scale other than 1/sqrt(D), through all three."""
    from rlhf_core.training.modeling import varlen_rows

    gen = torch.Generator().manual_seed(4)
    lengths = [5, 1, 7, 3]
    n = sum(lengths)
    q, k, v = (torch.randn(1, h, n, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_rows(kernel, q, k, v, cu, max(lengths), scaling)
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :, a:b] for t in (q, k, v)), is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert out.shape == (1, n, 4, 8)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_varlen_kernel_is_only_for_half_precision_on_cuda():
    """On the CPU (autocast or not), and for fp32 anywhere, rows end to end attend one SDPA call
    per row."""
    from rlhf_core.training.modeling import varlen_kernel

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.zeros(1, 2, 5, 16, dtype=dtype)
        assert varlen_kernel(q, {"dropout": 0.0, "scaling": 0.25}) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert varlen_kernel(q, {}) is None
    if torch.cuda.is_available():
        q = torch.zeros(1, 2, 5, 16, device="cuda")
        assert varlen_kernel(q, {}) is None  # fp32, no autocast
        assert varlen_kernel(q.bfloat16(), {"dropout": 0.1}) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen kernel needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["lm", "lm-lora", "scores"])
def test_packed_sdpa_on_cuda_through_torchs_varlen_kernel_matches_row_by_row(tok, kind, monkeypatch):
    """On a GPU with the kernel, under bf16 autocast (which hands the attention fp32 queries and
    keys from the rotary product): one varlen call per layer gives the row-by-row SDPA path's
    outputs and gradients to bf16 rounding."""
    from rlhf_core.training import modeling

    gen = torch.Generator().manual_seed(8)
    b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in (6, 3, 9, 1, 40)]})
    b = type(b)(*(t.cuda() for t in b))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kernel = modeling.varlen_kernel(torch.zeros(1, 1, 1, 64, device="cuda"), {})
    if kernel is None:
        pytest.skip("no varlen kernel on this GPU or torch")
    calls = []

    @functools.wraps(kernel)  # keeps the kernel's signature, which `varlen_rows` reads
    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(modeling, "_torch_varlen_attn", lambda: counted)
    runs = []
    for varlen in (True, False):
        if not varlen:
            monkeypatch.setattr(modeling, "varlen_kernel", lambda query, kwargs: None)
        m = packed_model(tok, kind).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(packed_outputs_and_grads(m, kind, b))
    assert calls == [torch.bfloat16] * 2  # one call per layer, in bf16, and only on the varlen run
    assert_same_outputs_and_grads(runs[0], runs[1], atol=2e-2, rtol=2e-2)


def test_loaded_models_run_packed_sdpa_and_save_a_config_plain_transformers_loads(tmp_path, tok):
    """Models the stages load or build are on `PACKED_SDPA`; padded batches and generation still
    run plain SDPA under it (same logits); a saved model's config names no attention
    implementation, so transformers without this package loads it on its default."""
    from transformers import AutoModelForCausalLM

    from rlhf_core.training.modeling import PACKED_SDPA, load_causal_lm, load_scalar_model, save_model

    save_model(build_tiny_causal_lm(TINY, tok, seed=3), tok, tmp_path / "m")
    lm, scalar = load_causal_lm(tmp_path / "m", ModelConfig()), load_scalar_model(tmp_path / "m", ModelConfig(), 0)
    assert lm.config._attn_implementation == scalar.config._attn_implementation == PACKED_SDPA
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.config._attn_implementation == "sdpa"
    batch = collate_lm({"input_ids": [[11, 12, 13, 14], [15, 16]]}, tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(lm, batch.input_ids, batch.attention_mask),
                                   forward_logits(plain, batch.input_ids, batch.attention_mask))
        prompt = torch.tensor([[11, 12, 13]])
        assert torch.equal(lm.generate(prompt, max_new_tokens=5, do_sample=False),
                           plain.generate(prompt, max_new_tokens=5, do_sample=False))
    save_model(lm, tok, tmp_path / "again")
    assert PACKED_SDPA not in (tmp_path / "again" / "config.json").read_text()


@pytest.mark.parametrize("lora", [False, True])
def test_sft_loss_and_gradients_of_a_packed_batch_equal_the_padded_batchs(tok, lora):
    """The same three chats (masked prompts of different lengths), padded and padding-free: the
    loss over the accumulated-token count and every trainable gradient agree."""
    rows = three_chats(tok, seed=6)
    grads = []
    for packed in (False, True):
        m = fresh_model(tok, lora)
        if packed:
            b = collate_lm_packed(rows)
            logits = forward_packed_logits(m, b.input_ids, b.position_ids)
        else:
            b = collate_lm(rows, tok.pad_token_id)
            logits = forward_logits(m, b.input_ids, b.attention_mask)
        loss, metrics = lm_loss(logits, b.labels, num_items=20)
        loss.backward()
        grads.append((float(loss), int(metrics["tokens"]),
                      {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (loss_pad, n_pad, g_pad), (loss_packed, n_packed, g_packed) = grads
    assert n_pad == n_packed == 7 + 2 + 9
    assert abs(loss_pad - loss_packed) < 1e-6
    assert g_pad.keys() == g_packed.keys() and len(g_pad) > 0
    for name in g_pad:
        torch.testing.assert_close(g_packed[name], g_pad[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_logits_at_the_scored_positions_only_give_the_full_logits_loss_logprobs_and_gradients(tok, lora):
    """A right-padded batch with prompts of different lengths: the (N, V) logits at
    `scored_mask(labels)` (N = trained tokens, here 7 + 2 + 9) give the (B, T, V) path's SFT loss,
    per-sequence log-prob sums and gradients."""
    rows = three_chats(tok, seed=7)
    b = collate_lm(rows, tok.pad_token_id)
    keep = scored_mask(b.labels)
    assert int(keep.sum()) == 18 and not keep[:, -1].any()
    out = []
    for kept in (False, True):
        m = fresh_model(tok, lora)
        logits = forward_logits(m, b.input_ids, b.attention_mask, keep if kept else None)
        assert logits.shape == ((18, len(tok)) if kept else (3, 14, len(tok)))
        loss, _ = lm_loss(logits, b.labels, num_items=18)
        logps = sequence_logprobs(logits, b.labels)
        (loss + logps.sum()).backward()
        out.append((float(loss), logps.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (loss_full, lp_full, g_full), (loss_kept, lp_kept, g_kept) = out
    assert abs(loss_full - loss_kept) < 1e-6
    torch.testing.assert_close(lp_kept, lp_full, atol=1e-5, rtol=1e-6)
    for name in g_full:
        torch.testing.assert_close(g_kept[name], g_full[name], atol=1e-6, rtol=1e-4, msg=name)
    if not lora:  # and both equal the straightforward sum over each sequence run alone
        m = fresh_model(tok, lora=False).eval()
        for i, (s, k) in enumerate(zip(rows["input_ids"], PROMPTS)):
            alone, _ = alone_logprobs(m, s)
            assert abs(float(lp_full[i]) - float(alone[k - 1:].sum())) < 1e-4


def test_packed_pairs_are_laid_out_chosen_then_rejected_with_each_rows_end():
    b = collate_pairs_packed({"prompt_ids": [[5, 6], [7]], "chosen_ids": [[8], [9, 10]],
                              "rejected_ids": [[11, 12], [13]], "weight": [1.0, 0.5]})
    assert b.input_ids.tolist() == [[5, 6, 8, 7, 9, 10, 5, 6, 11, 12, 7, 13]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    x = IGNORE_INDEX
    assert b.labels.tolist() == [[x, x, 8, x, 9, 10, x, x, 11, 12, x, 13]]
    assert b.ends.tolist() == [2, 5, 9, 11] and b.weights.tolist() == [1.0, 0.5] and b.tokens == 12


def tiny_scorer(tok, lora: bool):
    """A tiny one-label sequence classifier at seed 0 (the RM), with LoRA on q/v when asked."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    m = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1))
    if not lora:
        return m
    return apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj")), "SEQ_CLS")


def padded(rows):
    return collate_pairs(rows, pad_id=0)


def pair_grads(make_model, rows, collate, loss_of):
    """`loss_of(model, collate(rows))`'s outputs (the loss first, backpropagated) and the trainable gradients."""
    m = make_model()
    b = collate(rows)
    out = loss_of(m, b)
    out[0].backward()
    return [t.detach() for t in out], {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_shared_prompt_pairs_are_laid_out_prompt_chosen_rejected_with_their_mask():
    rows = {"prompt_ids": [[5, 6], [7]], "chosen_ids": [[8], [9, 10]], "rejected_ids": [[11, 12], [13]],
            "weight": [1.0, 0.5]}
    b = collate_pairs_shared(rows, pad_id=0, one_row=False)
    assert b.input_ids.tolist() == [[5, 6, 8, 11, 12], [7, 9, 10, 13, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    assert b.ends.tolist() == [2, 7, 4, 8] and b.weights.tolist() == [1.0, 0.5] and b.tokens == 9
    # pair 0: prompt 5 6 | chosen 8 | rejected 11 12; the rejected tokens see the prompt, not 8
    assert b.attention_mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                                     [1, 1, 0, 0, 0],
                                                     [1, 1, 1, 0, 0],
                                                     [1, 1, 0, 1, 0],
                                                     [1, 1, 0, 1, 1]]
    assert b.attention_mask[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1], "a padding query attends only to itself"
    one = collate_pairs_shared(rows, pad_id=0, one_row=True)
    assert one.input_ids.tolist() == [[5, 6, 8, 11, 12, 7, 9, 10, 13]]
    assert one.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    assert one.ends.tolist() == [2, 7, 4, 8] and one.tokens == 9
    assert not one.attention_mask[0, 0, 5:, :5].any(), "the second pair sees nothing of the first"
    assert one.attention_mask[0, 0, 8].int().tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 1]


RM_LAYOUTS = {"packed": collate_pairs_packed, "shared-prompt": lambda rows: collate_pairs_shared(rows, 0, False),
              "shared-prompt-one-row": lambda rows: collate_pairs_shared(rows, 0, True)}


@pytest.mark.parametrize("layout", list(RM_LAYOUTS))
@pytest.mark.parametrize("lora", [False, True])
def test_rm_rewards_and_gradients_of_packed_and_shared_prompt_pairs_equal_the_padded_pairs(tok, lora, layout):
    """Pairs of different lengths, end to end (`rm.padding_free`) or with each prompt computed once
    (`rm.share_prompt`, one row per pair or all in one row): each reward equals the score of its
    row run alone at its last token, and the pairwise loss and every trainable gradient equal the
    padded batch's. With the prompt shared, letting the rejected tokens also see the chosen ones
    (a plain causal mask over the row) changes the rejected rewards, so the mask is what keeps
    them right."""
    from rlhf_core.ops.losses import reward_pair_loss
    from rlhf_core.stages.rm import pair_rewards

    rows = pair_rows(tok, 3, seed=8)[:3]

    def loss_of(m, b):
        c, r = pair_rewards(m, b, "cpu")
        return reward_pair_loss(c, r, torch.zeros_like(c), 0.0)[0], c, r
    (loss_pad, c_pad, r_pad), g_pad = pair_grads(lambda: tiny_scorer(tok, lora), rows, padded, loss_of)
    (loss_new, c_new, r_new), g_new = pair_grads(lambda: tiny_scorer(tok, lora), rows, RM_LAYOUTS[layout], loss_of)
    torch.testing.assert_close(torch.stack([c_new, r_new]), torch.stack([c_pad, r_pad]), atol=1e-5, rtol=1e-5)
    assert abs(float(loss_pad) - float(loss_new)) < 1e-6
    assert g_pad.keys() == g_new.keys() and len(g_pad) > 0
    for name in g_pad:
        torch.testing.assert_close(g_new[name], g_pad[name], atol=1e-6, rtol=1e-4, msg=name)
    m = tiny_scorer(tok, lora).eval()
    with torch.no_grad():
        for k, key in enumerate(("chosen_ids", "rejected_ids")):
            for i in range(3):
                seq = rows["prompt_ids"][i] + rows[key][i]
                alone = m(input_ids=torch.tensor([seq])).logits[0, 0]
                assert abs(float((c_new, r_new)[k][i]) - float(alone)) < 1e-5
        if layout.startswith("shared-prompt"):
            b = RM_LAYOUTS[layout](rows)
            leaky = b._replace(attention_mask=b.attention_mask | torch.ones_like(b.attention_mask).tril())
            _, r_leak = pair_rewards(m, leaky, "cpu")
            assert (r_leak - r_pad).abs().max() > 1e-3


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_logprobs_token_counts_and_gradients_of_packed_pairs_equal_the_padded_pairs(model, tok, lora):
    """Each summed response log-prob equals its row run alone; the chosen-token counts, the DPO +
    RPO loss and every trainable gradient equal the padded batch's."""
    from rlhf_core.ops.losses import dpo_loss
    from rlhf_core.stages.dpo import pair_logprobs

    rows = pair_rows(tok, 3, seed=9)[:3]

    def loss_of(m, b):
        c, r, n = pair_logprobs(m, b, "cpu")
        loss = dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), 0.1, "sigmoid", 0.0)[0] - (c / n).mean()
        return loss, c, r, n
    def policy():
        return fresh_model(tok, lora)
    (loss_pad, c_pad, r_pad, n_pad), g_pad = pair_grads(policy, rows, padded, loss_of)
    (loss_packed, c_packed, r_packed, n_packed), g_packed = pair_grads(policy, rows, collate_pairs_packed, loss_of)
    assert n_packed.tolist() == n_pad.tolist() == [len(c) for c in rows["chosen_ids"]]
    torch.testing.assert_close(torch.stack([c_packed, r_packed]), torch.stack([c_pad, r_pad]), atol=1e-5, rtol=1e-5)
    assert abs(float(loss_pad) - float(loss_packed)) < 1e-6
    assert g_pad.keys() == g_packed.keys() and len(g_pad) > 0
    for name in g_pad:
        torch.testing.assert_close(g_packed[name], g_pad[name], atol=1e-6, rtol=1e-4, msg=name)
    for k, key in enumerate(("chosen_ids", "rejected_ids")):
        for i in range(3):
            resp = rows[key][i]
            alone, _ = alone_logprobs(model, rows["prompt_ids"][i] + resp)
            assert abs(float((c_packed, r_packed)[k][i]) - float(alone[-len(resp):].sum())) < 1e-4


def test_fused_adamw_gives_the_per_tensor_loops_weights_and_moments(tok):
    """`make_optimizer` takes torch's fused AdamW on CPU; three steps with weight decay, a second
    parameter group added later (as PPO adds its critic) and changing gradients end where the
    plain per-tensor AdamW ends."""
    from rlhf_core.training.optim import make_optimizer

    runs = []
    for fused in (True, False):
        actor, critic = build_tiny_causal_lm(TINY, tok, seed=3), build_tiny_causal_lm(TINY, tok, seed=4)
        if fused:
            opt = make_optimizer(actor.parameters(), 1e-2, 0.1)
            assert opt.defaults["fused"] is True
        else:
            opt = torch.optim.AdamW(actor.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
        opt.add_param_group({"params": list(critic.parameters()), "lr": 3e-3})
        gen = torch.Generator().manual_seed(0)
        params = list(actor.parameters()) + list(critic.parameters())
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((params, opt))
    (p_fused, opt_fused), (p_loop, opt_loop) = runs
    for a, b in zip(p_fused, p_loop):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_fused.state[a][key], opt_loop.state[b][key], atol=1e-7, rtol=1e-5)
    assert (p_loop[0] - build_tiny_causal_lm(TINY, tok, seed=3).get_input_embeddings().weight).abs().max() > 1e-2


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "sparse"])
def test_tied_embedding_gradient_lever_gives_the_dense_gradient_and_optimizer_step(tok, in_place):
    """The tied input embedding's lookup gradient either goes in place into the weight's gradient
    (one process) or comes back sparse for autograd to add into the head's (DDP): two micro-batches
    (accumulated, the padding row among the ids), then a fused AdamW step, end at the same dense
    gradient and weights as the dense lookup. Untied, frozen (LoRA) and scalar models are left
    alone, and a step whose graph never reaches the head still leaves a dense gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_core.training.modeling import sparse_tied_embedding_grad
    from rlhf_core.training.optim import make_optimizer

    batches = [collate_lm(three_chats(tok, seed=s), tok.pad_token_id) for s in (8, 9)]
    pad = build_tiny_causal_lm(TINY, tok, seed=3).get_input_embeddings().padding_idx
    assert pad is not None and pad not in (11, 12)
    runs = []
    for lever in (False, True):
        m = build_tiny_causal_lm(TINY, tok, seed=3)
        if lever:
            assert sparse_tied_embedding_grad(m, in_place=in_place)
            assert m.get_input_embeddings().sparse != in_place
        opt = make_optimizer(m.parameters(), 1e-2, 0.1)
        for b in batches:
            loss, _ = lm_loss(forward_logits(m, b.input_ids, b.attention_mask), b.labels, num_items=36)
            loss.backward()
        w = m.get_input_embeddings().weight
        assert w.grad.layout == torch.strided and w.grad.is_contiguous()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        runs.append((grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    (g_dense, w_dense), (g_lever, w_lever) = runs
    emb = "model.embed_tokens.weight"
    assert (g_dense[emb] != 0).any(dim=1).sum() > len(set(batches[0].input_ids.flatten().tolist()))  # head rows too
    for name in g_dense:
        torch.testing.assert_close(g_lever[name], g_dense[name], atol=1e-7, rtol=1e-6, msg=name)
        torch.testing.assert_close(w_lever[name], w_dense[name], atol=1e-7, rtol=1e-6, msg=name)

    # only the embedding is touched (no head in the graph): a dense gradient all the same, with
    # none for the padding row (as nn.Embedding gives)
    m = build_tiny_causal_lm(TINY, tok, seed=3)
    assert sparse_tied_embedding_grad(m, in_place=in_place)
    m.get_input_embeddings()(torch.tensor([[11, 12, 11, pad]])).sum().backward()
    g = m.get_input_embeddings().weight.grad
    assert g.layout == torch.strided and g[11].eq(2).all() and g[12].eq(1).all() and g.abs().sum() == 3 * TINY.hidden_size
    with torch.no_grad():  # generation and frozen scoring: a plain lookup, no graph
        assert not m.get_input_embeddings()(torch.tensor([[11]])).requires_grad

    # left alone: untied, LoRA (frozen embedding), a scalar model (no head)
    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               pad_token_id=0)
    untied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    scalar = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1))
    for other in (untied, fresh_model(tok, lora=True), scalar):
        assert not sparse_tied_embedding_grad(other, in_place=in_place)
        assert not other.get_input_embeddings().sparse and "forward" not in vars(other.get_input_embeddings())


@pytest.mark.parametrize("case", ["padded", "packed", "lora", "tied-in-place", "qwen2-untied", "bf16-autocast",
                                  "checkpointed"])
def test_lm_head_left_to_the_loss_gives_the_logits_loss_and_gradients(tok, case):
    """Lever (memory): the SFT loss with the head's product inside the loss (`batch_loss`:
    `head_deferred` + `lm_head_loss`) against the loss of the model's own (N, V) logits, three
    chats with masked prompts, two micro-batches accumulated over their 18 + 18 trained tokens:
    padded and end to end, under LoRA (a frozen head), with the tied embedding's in-place gradient
    lever (the head's gradient arrives first, through the loss), on Qwen2 with an untied head,
    under bf16 autocast and with gradient checkpointing: the same losses and gradients, bit for
    bit (every case fits one chunk).
    The head's forward is the model's own again after the block."""
    from rlhf_core.stages.lm import batch_loss
    from rlhf_core.training.modeling import enable_gradient_checkpointing, hf_model, sparse_tied_embedding_grad

    chats = [three_chats(tok, seed=s) for s in (21, 22)]
    collate = collate_lm_packed if case == "packed" else (lambda r: collate_lm(r, tok.pad_token_id))
    out = []
    for fused in (False, True):
        if case == "qwen2-untied":
            m = _trim_model("qwen2", vocab_size=len(tok))
            assert m.lm_head.weight is not m.get_input_embeddings().weight
        else:
            m = fresh_model(tok, lora=case == "lora")
        if case == "tied-in-place":
            assert sparse_tied_embedding_grad(m, in_place=True)
        if case == "checkpointed":
            enable_gradient_checkpointing(m)
            m.train()
        losses = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16-autocast"):
            for rows in chats:
                b = collate(rows)
                if fused:
                    loss, metrics = batch_loss(m, b, "cpu", num_items=36)
                else:
                    keep = scored_mask(b.labels)
                    logits = (forward_packed_logits(m, b.input_ids, b.position_ids, keep) if case == "packed"
                              else forward_logits(m, b.input_ids, b.attention_mask, keep))
                    loss, metrics = lm_loss(logits, b.labels, num_items=36)
                loss.backward()
                losses.append((loss.detach(), metrics["loss"], int(metrics["tokens"])))
        out.append((losses, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
        assert "forward" not in vars(hf_model(m).get_output_embeddings())
    (l_plain, g_plain), (l_fused, g_fused) = out
    assert [n for *_, n in l_plain] == [n for *_, n in l_fused] == [18, 18]
    assert all(torch.equal(a, b) for x, y in zip(l_fused, l_plain) for a, b in zip(x[:2], y[:2]))
    assert g_fused.keys() == g_plain.keys() and len(g_plain) > 0
    for name in g_plain:
        assert torch.equal(g_fused[name], g_plain[name]), name
    head = [n for n in g_plain if "embed_tokens" in n or "lm_head" in n]
    assert case == "lora" or any(g_plain[n].abs().max() > 0 for n in head)


def test_head_deferred_only_where_nothing_follows_the_head():
    """The models whose logits are their head's output (Llama, Qwen2) hand their head to the loss
    and return (N, d) hidden states inside the block; a head with a bias, or adapters on the head,
    or another model class (a sequence classifier) leave the forward as it is."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_core.training.modeling import head_deferred

    ids = torch.tensor([[5, 6, 7, 8]])
    keep = torch.tensor([[True, False, True, False]])
    for m in (_trim_model("qwen2"), _trim_model("llama"), _trim_model("llama-lora")):
        with head_deferred(m) as w:
            assert w is not None and w.shape == (100, 32)
            out = forward_logits(m, ids, torch.ones_like(ids), keep)
        assert out.shape == (2, 32)
        torch.testing.assert_close(torch.nn.functional.linear(out, w), forward_logits(m, ids, torch.ones_like(ids), keep))
    biased = _trim_model("llama")
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(100))
    on_head = apply_lora(_trim_model("llama"), LoraConfig(enabled=True, r=4, alpha=8, target_modules=("lm_head",)))
    scalar = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=4, pad_token_id=0))
    for m in (biased, on_head, scalar):
        with head_deferred(m) as w:
            assert w is None


def _trim_cases():
    """(name, model kind, forward) for `last_layer_at`: each forward returns the kept outputs."""
    from rlhf_core.stages.rm import pair_rewards
    from rlhf_core.training.modeling import token_scores

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 9:], mask[1, :4] = 0, 0  # a right-padded row and a left-padded row
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 5:8], keep[1, 6:11], keep[2, 2] = True, True, True  # 3, 5 and 1 kept positions
    packed_pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    packed_keep = torch.zeros(1, 12, dtype=torch.bool)
    packed_keep[0, [2, 3, 5, 9, 10]] = True
    pairs = {"prompt_ids": [[5, 6, 7], [8], [9, 10]], "chosen_ids": [[11, 12], [13, 14, 15, 16], [17]],
             "rejected_ids": [[18], [19, 20], [21, 22, 23, 24, 25]], "weight": [1.0] * 3}
    rewards = {name: (lambda m, c=collate: torch.stack(pair_rewards(m, c(pairs), "cpu")))
               for name, collate in (("padded", padded), *RM_LAYOUTS.items())}
    return [
        ("lm-mask", "llama", lambda m: forward_logits(m, ids, mask, keep)),
        ("lm-positions", "llama", lambda m: forward_logits(m, ids, mask, torch.arange(6, 11))),
        ("lm-lora", "llama-lora", lambda m: forward_logits(m, ids, mask, keep)),
        ("lm-packed", "llama", lambda m: forward_packed_logits(m, ids[:1], packed_pos, packed_keep)),
        ("qwen2-mask", "qwen2", lambda m: forward_logits(m, ids, mask, keep)),
        ("values-positions", "scores", lambda m: token_scores(m, ids, mask, keep=torch.arange(6, 11))[:, 6:11]),
        *((f"rm-{name}", "scores", f) for name, f in rewards.items()),
        ("rm-lora", "scores-lora", rewards["padded"]),
    ]


def _trim_model(kind: str, vocab_size: int = 100):
    """Tiny models with grouped-query attention (4 query heads, 2 key-value heads), seed 1."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config,
                              Qwen2ForCausalLM)
    from rlhf_core.training.modeling import use_packed_sdpa

    sizes = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(1)
    base = kind.removesuffix("-lora")
    m = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**sizes)), "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**sizes)),
         "scores": lambda: LlamaForSequenceClassification(LlamaConfig(**sizes, num_labels=1))}[base]()
    m = use_packed_sdpa(m)
    if kind.endswith("-lora"):
        m = apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj")),
                       "SEQ_CLS" if base == "scores" else "CAUSAL_LM")
        with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("case", range(len(_trim_cases())), ids=[c[0] for c in _trim_cases()])
def test_last_layer_at_the_kept_positions_gives_the_full_layers_outputs_and_gradients(case, monkeypatch):
    """Padded rows (right and left padding, 3, 5 and 1 kept positions, or the same positions in
    every row), rows end to end, RM pairs in every layout, LoRA, and Qwen2 (biased q/k/v): the
    outputs read at the kept positions and every trainable gradient equal the full last layer's,
    the trimmed forward ran once, and the layer's own forward is back afterwards. Under gradient
    checkpointing the full layer runs (its recomputation would come after the block)."""
    from rlhf_core.training import modeling

    _, kind, forward = _trim_cases()[case]
    trimmed = modeling._last_layer_forward
    results = []
    for mode in ("full", "trimmed", "checkpointed"):
        m = _trim_model(kind).train()
        if mode == "checkpointed":
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        monkeypatch.setattr(modeling, "_last_layer_forward", lambda *a, **k: calls.append(1) or trimmed(*a, **k))
        if mode == "full":
            monkeypatch.setattr(modeling, "_last_layer", lambda model: None)
        out = forward(m)
        monkeypatch.undo()
        out.square().sum().backward()
        assert len(calls) == (mode == "trimmed"), mode
        assert "forward" not in vars(modeling.hf_model(m).model.layers[-1])
        results.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (out_full, g_full), *others = results
    assert len(g_full) > 0 and all(g.abs().sum() > 0 for g in g_full.values())
    for out, g in others:
        torch.testing.assert_close(out, out_full, atol=1e-5, rtol=1e-5)
        assert g.keys() == g_full.keys()
        for name in g_full:
            torch.testing.assert_close(g[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_last_layer_at_the_kept_positions_would_differ_if_a_kept_query_saw_a_later_key(monkeypatch):
    """The kept queries' mask is what makes the parity above: one that also sees the keys after
    it (a plain full mask) changes the kept logits."""
    from rlhf_core.training import modeling

    _, kind, forward = _trim_cases()[0]
    with torch.no_grad():
        full = forward(_trim_model(kind))
        plan = modeling._kept_queries
        monkeypatch.setattr(modeling, "_kept_queries",
                            lambda *a: (*plan(*a)[:2], torch.ones_like(plan(*a)[2])))
        leaky = forward(_trim_model(kind))
    assert (leaky - full).abs().max() > 1e-3


def test_last_layer_at_runs_the_full_layer_where_a_row_keeps_most_positions(monkeypatch):
    """Keeping more than `TRIM_AT_MOST` of a row's positions (PT: all but the last) is left to the
    full layer, where trimming costs about what it saves; three quarters and fewer are trimmed."""
    from rlhf_core.training import modeling

    trimmed, calls = modeling._last_layer_forward, []
    monkeypatch.setattr(modeling, "_last_layer_forward", lambda *a, **k: calls.append(1) or trimmed(*a, **k))
    m, ids, mask = _trim_model("llama"), torch.randint(3, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        for kept, trims in ((11, False), (10, False), (9, True), (3, True)):  # 9 of 12: three quarters
            keep = torch.zeros(2, 12, dtype=torch.bool)
            keep[:, 11 - kept:11] = True
            calls.clear()
            forward_logits(m, ids, mask, keep)
            assert len(calls) == trims, kept


def test_last_layer_at_runs_the_full_layer_where_rows_end_to_end_would_attend_over_more_than_it_saves(monkeypatch):
    """Rows end to end: the kept queries attend over every key of the layout under a mask (K x T
    pairs), the full layer within each row. With half of each 10-token row kept, 4 rows (T 40,
    K 20: 800 - 220 = 580 pairs more than the full layer's, against 20 skipped positions x 128
    pairs each for this model) are trimmed; 40 rows (T 400, K 200: 77,800 more, against 200 x 128)
    run the full layer. Both give the full layer's logits at the kept positions."""
    from rlhf_core.training import modeling

    m = _trim_model("llama")
    assert modeling._pairs_per_position(modeling._last_layer(m)) == 128  # (4*32*32 + 6*32*64) / (4*32)
    trimmed, calls = modeling._last_layer_forward, []
    g = torch.Generator().manual_seed(3)
    for rows, trims in ((4, True), (40, False)):
        ids, pos = torch.randint(3, 100, (1, 10 * rows), generator=g), torch.arange(10).repeat(rows)[None]
        keep = (pos >= 4) & (pos < 9)
        with torch.no_grad():
            monkeypatch.setattr(modeling, "_last_layer", lambda model: None)
            full = forward_packed_logits(m, ids, pos, keep)
            monkeypatch.undo()
            calls.clear()
            monkeypatch.setattr(modeling, "_last_layer_forward", lambda *a, **k: calls.append(1) or trimmed(*a, **k))
            got = forward_packed_logits(m, ids, pos, keep)
            monkeypatch.undo()
        assert len(calls) == trims, rows
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_trim_pays_hand_values():
    """SmolLM2's sizes (width 576, 9 x 64 query heads, MLP 1536) make a skipped position worth 2880
    query-key pairs; a padded layout pays while its kept pairs stay within that, and SFT at batch
    256 end to end (22,000 tokens in 256 rows of about 86, 11,000 kept) does not."""
    from rlhf_core.training.modeling import _trim_pays

    per = (4 * 576 * 576 + 6 * 576 * 1536) / (4 * 576)
    assert per == 2880
    assert _trim_pays(4, 150, 200, 4 * 200 * 201 // 2, per)  # padded: 120,000 kept pairs, 80,400 full
    assert not _trim_pays(4, 150, 200, 4 * 200 * 201 // 2, 20.0)  # a model whose products were cheap
    full = 256 * 86 * 87 // 2
    assert not _trim_pays(1, 11_000, 22_016, full, per)  # 241M pairs more against 31.7M
    assert _trim_pays(1, 90, 180, 2 * 90 * 91 // 2, per)  # batch 2 end to end: 8,010 more against 259,200


def three_layer_model(tok, lora: bool = False):
    """The tiny model with three layers at seed 4 (two compiled under `compile_layers`), with LoRA on
    q/v when asked."""
    m = build_tiny_causal_lm(ModelConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                                         vocab_size=320), tok, seed=4)
    return apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj"))) if lora else m


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_layers_give_the_eager_logits_and_gradients_with_one_graph_for_every_length(tok, lora):
    """`compile: true` (`compile_layers`): every decoder layer but the last compiled for dynamic
    shapes gives the eager model's logits and gradients, for padded batches of three lengths with
    the last layer run at every position and only at the scored ones, and for rows end to end. The
    compiled layers (two here) share one graph, which the padded batches' new lengths do not
    recompile (two graphs under LoRA, whose first layer takes an input needing no gradient); the
    names of the parameters (checkpoints, saved models) stay as they were."""
    import torch._dynamo

    from rlhf_core.training.modeling import compile_layers, decoder_layers

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = three_layer_model(tok, lora), three_layer_model(tok, lora)
    assert compile_layers(compiled) == 2 and len(decoder_layers(compiled)) == 3
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    gen = torch.Generator().manual_seed(6)
    for lengths in ((9, 4, 7), (14, 3, 11), (6, 12, 2)):
        rows = [ids(gen, n, tok) for n in lengths]
        b = collate_lm({"input_ids": rows, "labels": [[IGNORE_INDEX] * (len(r) // 2) + r[len(r) // 2:] for r in rows]},
                       tok.pad_token_id)
        for keep in (None, scored_mask(b.labels)):
            def run(m):
                return forward_logits(m, b.input_ids, b.attention_mask, keep)
            # gradients of order 1e2 (a sum over every position): inductor's kernels round differently
            assert_same_outputs_and_grads(outputs_and_grads(compiled, run), outputs_and_grads(eager, run), atol=1e-4)
    # under LoRA the first layer's input (from the frozen embedding) needs no gradient: a second graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == (2 if lora else 1)
    packed = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in (5, 9, 3)]})

    def run_packed(m):
        return forward_packed_logits(m, packed.input_ids, packed.position_ids)
    assert_same_outputs_and_grads(outputs_and_grads(compiled, run_packed), outputs_and_grads(eager, run_packed), atol=1e-4)


OPAQUE_CALLS: list[tuple] = []


@torch.library.custom_op("rlhf_tests::block_causal_attention", mutates_args=())
def _block_causal_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, scale: float | None, window_size: list[int],
                     enable_gqa: bool) -> torch.Tensor:
    OPAQUE_CALLS.append(tuple(q.shape))  # run, not traced: the compiler sees only the fake below
    return block_causal_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=tuple(window_size),
                                  enable_gqa=enable_gqa).contiguous()


@_block_causal_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
    return q.new_empty(q.shape)


def opaque_kernel_2_12(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                       enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """`block_causal_attention` behind torch 2.12's signature as one opaque op, as torch's own
    `varlen_attn` is to the compiler (a `torch.library.custom_op` with a fake kernel)."""
    return _block_causal_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, list(window_size), enable_gqa)


def test_compiled_layers_reach_a_varlen_kernel_without_graph_breaks_or_recompiles(tok, monkeypatch):
    """`compile: true` on a GPU, rows end to end: the compiled layers must hand the rows to the
    varlen kernel inside their graph, or every layer would break in two at its attention and the
    compiled row (`benchmarks/gpu/run.sh`, `sft-b256-free-compile`) would measure that. The kernel
    needs a GPU, so here it is `block_causal_attention` as an opaque op: three packings of other
    lengths (new offsets, new longest row, each an argument of the kernel) trace into one graph
    with no break, call the kernel from every layer, and give the eager row-by-row model's logits.
    (Where there is no kernel, on the CPU, the row-by-row path reads the rows' lengths and breaks
    the graph at each layer; the README says so.)"""
    import torch._dynamo

    from rlhf_core.training import modeling

    def choose(query, kwargs):
        return opaque_kernel_2_12
    eager, compiled = three_layer_model(tok), three_layer_model(tok)
    assert modeling.compile_layers(compiled) == 2
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(10)
    for lengths in ((6, 3, 9), (12, 5, 7, 2), (20, 4)):
        b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in lengths]})
        with torch.no_grad(), monkeypatch.context() as patch:
            want = forward_packed_logits(eager, b.input_ids, b.position_ids)
            patch.setattr(modeling, "varlen_kernel", choose)
            OPAQUE_CALLS.clear()
            got = forward_packed_logits(compiled, b.input_ids, b.position_ids)
        assert OPAQUE_CALLS == [(sum(lengths), 2, 16)] * 3  # every layer, the two compiled ones included
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_the_device_capability_is_a_constant_to_the_compiler(monkeypatch):
    """`varlen_kernel` asks for the GPU's compute capability from inside a compiled layer. Dynamo
    must take it as a constant (`torch.compiler.assume_constant_result`), not trace into
    `torch.cuda`: here the lookup behind it is a function dynamo cannot trace (it reads a file),
    and a function that asks for it compiles into one graph all the same."""
    from rlhf_core.training import modeling

    def untraceable(index):
        with open(__file__) as f:
            f.read(1)
        return (9, 0)
    monkeypatch.setattr(modeling, "_device_capability", untraceable)
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2 if modeling._capability(x.device.index) >= (8, 0) else x,
                           fullgraph=True, backend="eager")
    assert double(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen kernel needs a CUDA GPU")
def test_compiled_layers_through_torchs_varlen_kernel_match_eager_on_cuda(tok):
    """`compile: true` on a GPU with rows end to end under bf16 autocast: the compiled layers reach
    torch's varlen kernel too, with no graph break (the device's own `varlen_kernel` checks
    included), and give the eager model's logits and gradients to bf16 rounding."""
    import torch._dynamo

    from rlhf_core.training.modeling import compile_layers, varlen_kernel

    with torch.autocast("cuda", dtype=torch.bfloat16):
        if varlen_kernel(torch.zeros(1, 1, 1, 64, device="cuda"), {}) is None:
            pytest.skip("no varlen kernel on this GPU or torch")
    gen = torch.Generator().manual_seed(9)
    b = collate_lm_packed({"input_ids": [ids(gen, n, tok) for n in (6, 3, 9, 1, 40)]})
    b = type(b)(*(t.cuda() for t in b))
    runs = []
    for compiled in (False, True):
        m = packed_model(tok, "lm").cuda()
        if compiled:
            assert compile_layers(m) == 1
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(packed_outputs_and_grads(m, "lm", b))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert_same_outputs_and_grads(runs[1], runs[0], atol=2e-2, rtol=2e-2)
