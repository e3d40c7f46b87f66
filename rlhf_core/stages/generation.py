"""Sampling responses from a policy, as PPO rollouts and the evaluation need them."""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import NamedTuple

import torch

from rlhf_core.data.batching import PromptBatch


class Rollout(NamedTuple):
    sequences: torch.Tensor       # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, P + R) 0 on padding and after the first EOS
    response_mask: torch.Tensor   # (B, R) 1 on response tokens up to and including EOS
    prompt_length: int            # P
    has_eos: torch.Tensor         # (B,) bool
    logprobs: torch.Tensor | None = None  # (B, R) log-probs of the drawn tokens at sampling (`sample(logprobs=True)`)


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, R) that keeps tokens up to and including the first EOS, and whether one exists.
    Works when pad == eos because it looks only at the first EOS."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long(), has_eos


def generation_config(eos_id: int, pad_id: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, greedy: bool = False):
    """A GenerationConfig from our parameters alone: plain sampling from softmax(logits / T),
    optionally top-k / top-p truncated, or greedy. `sample` fills every other field with
    transformers' neutral defaults, never the checkpoint's (a `repetition_penalty`, say), so the
    samples come from the policy whose log-probs PPO computes."""
    from transformers import GenerationConfig

    # top_k must be 0, not None: transformers fills None with its global default of 50
    return GenerationConfig(do_sample=not greedy, temperature=1.0 if greedy else temperature,
                            top_k=0 if greedy else top_k, top_p=1.0 if greedy else top_p, num_beams=1,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)


@contextmanager
def _only_config(model, config):
    """transformers fills every unset field of a passed config from `model.generation_config`;
    holding ours there for the call leaves nothing of the checkpoint's to inherit."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf_model.generation_config
    hf_model.generation_config = config
    try:
        yield
    finally:
        hf_model.generation_config = saved


class _TokenLogprobs:
    """A logits processor, first in the list, so it sees each step's raw logits: it keeps
    log_softmax(logits / T) in fp32 (one (B, V) tensor) and, at the next step, reads the token
    that was drawn from it. `result` reads the last step's against the finished responses."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.picked = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.picked.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def result(self, responses: torch.Tensor) -> torch.Tensor:
        """(B, R) log-probs of `responses`' tokens (zeros where no step was recorded)."""
        picked = self.picked[:responses.shape[1]]
        if self.last is not None and len(picked) < responses.shape[1]:
            picked.append(self.last.gather(-1, responses[:, len(picked), None]).squeeze(-1))
        out = responses.new_zeros(responses.shape, dtype=torch.float32)
        if picked:
            out[:, :len(picked)] = torch.stack(picked, 1)
        return out


def _sampling_processors(recorder: _TokenLogprobs, temperature: float, top_k: int, top_p: float):
    """[recorder, the temperature / top-k / top-p warpers generate would build from them, in its
    order]: the same draws, with the generation config's own warpers left neutral."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [recorder]
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(warpers)


FEW_ROWS = range(2, 5)
"""Row counts at which `few_rows_linear` computes a linear layer as W @ x.T: a decoding step of 2 to
4 sequences. Measured on 2 CPU cores in fp32 (SmolLM2's shapes, weights read from memory): the
usual x @ W.T read the weights at 5-9 GB/s for 2 to 4 rows, W @ x.T at 13-37 GB/s; at 1 row the
two are level, and from 8 rows on neither wins everywhere."""


@contextmanager
def few_rows_linear(model):
    """Lever, while `model` samples on a CPU: each plain fp32 `nn.Linear` whose input holds
    `FEW_ROWS` rows (one decoding step of 2 to 4 sequences) computes (W @ x.T).T instead of
    x @ W.T, the same products summed in another order. A decoding step reads every weight once for
    a few rows, so it is bound by how fast the product reads W, and torch's CPU matrix library reads
    a (rows, in) x (in, out)^T product several times slower than a (out, in) x (in, rows) one at
    these sizes (SmolLM2, 4 prompts, 24 tokens: 2.6 s against 1.65 s, the same draws). Other
    inputs, other devices and dtypes, subclasses (quantized layers) and modules whose forward is
    already replaced (accelerate's hooks) keep their own forward; every forward is restored after."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
    for m in linears:
        m.forward = types.MethodType(_few_rows_forward, m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def _few_rows_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = linear.weight
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows not in FEW_ROWS or not (x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.float32):
        return torch.nn.functional.linear(x, w, linear.bias)
    y = (w @ x.reshape(rows, -1).t()).t()
    if linear.bias is not None:
        y = y + linear.bias
    return y.reshape(*x.shape[:-1], w.shape[0])


@torch.no_grad()
def sample(model, batch: PromptBatch, eos_id: int, pad_id: int, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           logprobs: bool = False) -> Rollout:
    """Sample (or greedily decode) a response to each prompt of `batch` under `generation_config`.
    `logprobs` (sampling only): also keep each drawn token's log-prob under the sampling logits at
    `temperature`, before top-k / top-p (as PPO's forward computes it), in `Rollout.logprobs`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    recorder = _TokenLogprobs(temperature) if logprobs and not greedy else None
    if recorder is None:
        config, processors = generation_config(eos_id, pad_id, max_new_tokens, temperature, top_k, top_p, greedy), None
    else:  # the warpers go after the recorder, so the config's are neutral
        config = generation_config(eos_id, pad_id, max_new_tokens)
        processors = _sampling_processors(recorder, temperature, top_k, top_p)
    with _only_config(model, config), few_rows_linear(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    model.train(was_training)
    P = ids.shape[1]
    responses = out[:, P:]
    if responses.shape[1] == 0:  # generation stopped before emitting anything
        responses = torch.full((ids.shape[0], 1), eos_id, device=device)
    rmask, has_eos = response_mask(responses, eos_id)
    sequences = torch.cat([ids, responses], 1)
    return Rollout(sequences, torch.cat([mask, rmask], 1), rmask, P, has_eos,
                   recorder.result(responses) if recorder else None)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    rows = []
    for seq, m in zip(rollout.sequences[:, rollout.prompt_length:], rollout.response_mask):
        rows.append(tokenizer.decode(seq[m.bool()].tolist(), skip_special_tokens=True).strip())
    return rows
