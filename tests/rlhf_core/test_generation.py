"""Sampling uses only our parameters: nothing of a checkpoint's `generation_config` leaks in."""
from __future__ import annotations

import pytest
import torch

from rlhf_core.data.batching import PromptBatch
from rlhf_core.stages.generation import generation_config, response_mask, sample

EOS, PAD = 1, 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)).eval()


@pytest.fixture(scope="module")
def prompts() -> PromptBatch:
    ids = torch.randint(2, 40, (6, 5), generator=torch.Generator().manual_seed(3))
    ids[0, :2] = PAD  # one left-padded prompt
    mask = (torch.arange(5) >= 2).long().expand(6, 5).clone()
    mask[1:] = 1
    return PromptBatch(ids, mask)


def _draw(model, prompts, **kw):
    torch.manual_seed(7)
    return sample(model, prompts, EOS, PAD, max_new_tokens=12, **kw).sequences


def test_a_checkpoints_repetition_penalty_does_not_change_the_samples(prompts):
    plain = tiny_llama()
    penalised = tiny_llama()
    penalised.generation_config.repetition_penalty = 5.0
    penalised.generation_config.no_repeat_ngram_size = 1
    penalised.generation_config.top_k = 3
    assert torch.equal(_draw(penalised, prompts), _draw(plain, prompts))
    assert torch.equal(_draw(penalised, prompts, greedy=True), _draw(plain, prompts, greedy=True))
    assert penalised.generation_config.repetition_penalty == 5.0  # the model's own config is restored
    # the test can fail: transformers' own generate does apply the checkpoint's penalty
    torch.manual_seed(7)
    leaky = penalised.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                               max_new_tokens=12, do_sample=True, eos_token_id=EOS, pad_token_id=PAD)
    assert not torch.equal(leaky, _draw(plain, prompts)[:, :leaky.shape[1]])


def test_the_generation_config_holds_our_parameters_and_no_default_top_k():
    cfg = generation_config(EOS, PAD, 24, temperature=0.7, top_k=0, top_p=0.9)
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.max_new_tokens) == (True, 0.7, 0.9, 24)
    assert cfg.top_k == 0  # not None, which transformers would replace by 50
    assert (cfg.eos_token_id, cfg.pad_token_id) == (EOS, PAD)
    assert generation_config(EOS, PAD, 5, greedy=True).do_sample is False


def test_top_k_one_samples_the_greedy_answer(prompts):
    model = tiny_llama(seed=1)
    assert torch.equal(_draw(model, prompts, top_k=1), _draw(model, prompts, greedy=True))


def test_response_mask_stops_after_the_first_eos_even_when_pad_is_eos():
    responses = torch.tensor([[5, EOS, EOS, EOS], [5, 6, 7, 8]])
    mask, has_eos = response_mask(responses, EOS)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and has_eos.tolist() == [True, False]


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 5}, {"temperature": 1.3, "top_p": 0.8}],
                         ids=["plain", "T0.7-topk5", "T1.3-topp0.8"])
def test_sampled_logprobs_are_the_full_forwards_and_leave_the_draws_alone(prompts, kw):
    """`sample(logprobs=True)` (`ppo.sampling_logprobs`) draws the same tokens, and each response
    token's log-prob (up to its EOS) is log_softmax(logits / T) of one full forward over the whole
    sequence, untruncated by top-k / top-p, as PPO's own forward computes it."""
    model = tiny_llama(seed=2)
    torch.manual_seed(7)
    plain = sample(model, prompts, EOS, PAD, max_new_tokens=30, **kw)
    torch.manual_seed(7)
    rollout = sample(model, prompts, EOS, PAD, max_new_tokens=30, logprobs=True, **kw)
    assert plain.logprobs is None and torch.equal(rollout.sequences, plain.sequences)
    P, R = rollout.prompt_length, rollout.response_mask.shape[1]
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.double()
    logp = torch.log_softmax(logits[:, P - 1:P - 1 + R] / kw.get("temperature", 1.0), -1)
    want = logp.gather(-1, rollout.sequences[:, P:, None]).squeeze(-1)
    keep = rollout.response_mask.bool()
    assert rollout.logprobs.shape == (prompts.input_ids.shape[0], R) and rollout.logprobs.dtype == torch.float32
    assert keep.sum() > 30 and (~keep).any()  # some response stops at EOS before the last step
    torch.testing.assert_close(rollout.logprobs[keep].double(), want[keep], atol=1e-5, rtol=1e-5)
    # the check can fail: the log-probs one position off, or at T = 1, are not these
    assert not torch.allclose(rollout.logprobs[:, 1:][keep[:, 1:]].double(), want[:, :-1][keep[:, 1:]], atol=1e-3)
    if kw:
        assert not torch.allclose(rollout.logprobs[keep].double(), logp.mul(kw["temperature"]).log_softmax(-1)
                                  .gather(-1, rollout.sequences[:, P:, None]).squeeze(-1)[keep], atol=1e-3)


def test_greedy_decoding_has_no_sampled_logprobs(prompts):
    model = tiny_llama(seed=2)
    assert sample(model, prompts, EOS, PAD, max_new_tokens=4, greedy=True, logprobs=True).logprobs is None


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_is_the_plain_product_and_is_restored(monkeypatch, bias):
    """`few_rows_linear` (the decoding lever): 2 to 4 rows go through W @ x.T, equal to x @ W.T up to
    float rounding; other row counts go through the plain product, bit for bit; afterwards each
    layer's own forward is back, and a layer whose forward was already replaced is left alone."""
    from rlhf_core.stages import generation

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96, bias=bias), torch.nn.Linear(96, 48, bias=bias))
    hooked = model[1]
    hooked.forward = lambda x: torch.nn.functional.linear(x, hooked.weight, hooked.bias)  # as accelerate's hooks do
    calls = []
    plain_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[0].shape) or plain_linear(*a))
    layer = model[0]
    for shape in [(1, 1, 48), (2, 1, 48), (3, 1, 48), (4, 48), (2, 2, 48), (5, 1, 48), (8, 48), (2, 7, 48)]:
        x = torch.randn(shape)
        expected = plain_linear(x, layer.weight, layer.bias)
        calls.clear()
        with generation.few_rows_linear(model):
            got = layer(x)
            assert model[1] is hooked and hooked.forward.__class__.__name__ == "function"
        rows = x.numel() // 48
        assert got.shape == expected.shape
        if rows in generation.FEW_ROWS:
            assert calls == [] and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        else:
            assert calls == [x.shape] and torch.equal(got, expected)
    assert "forward" not in layer.__dict__ and "forward" in hooked.__dict__


def test_sampling_a_few_prompts_draws_what_the_plain_product_draws(prompts, monkeypatch):
    """A rollout of 3 prompts decodes through `few_rows_linear`: the same tokens and the same
    recorded log-probs (to float rounding) as with the lever off, and the lever did engage."""
    from rlhf_core.stages import generation

    model = tiny_llama()
    few = PromptBatch(prompts.input_ids[:3], prompts.attention_mask[:3])
    engaged = []
    forward = generation._few_rows_forward
    monkeypatch.setattr(generation, "_few_rows_forward",
                        lambda m, x: engaged.append(x.numel() // x.shape[-1] in generation.FEW_ROWS) or forward(m, x))

    def draw():
        torch.manual_seed(11)
        return sample(model, few, EOS, PAD, max_new_tokens=16, temperature=0.9, logprobs=True)

    lever = draw()
    assert any(engaged) and not all(engaged)  # decoding steps (3 rows) do, the prompt's forward (3 x 5) does not
    monkeypatch.setattr(generation, "FEW_ROWS", range(0))
    plain = draw()
    assert torch.equal(lever.sequences, plain.sequences)
    assert torch.allclose(lever.logprobs, plain.logprobs, atol=1e-5)
