"""Chat templates of a real model (SmolLM2-135M-Instruct: ChatML, pad == eos == <|im_end|>).

The trained tokens are the assistant content and the template's own end-of-turn token, once;
what the template adds after it (ChatML's newline) is context, not target.
"""
from __future__ import annotations

import copy

import pytest

from rlhf_core.config import TokenizeConfig
from rlhf_core.data.encoding import (
    IGNORE_INDEX,
    TemplateError,
    encode_preference,
    encode_prompt,
    encode_sft,
    tokenize_datasets,
)
from rlhf_core.data.formats import Conversation, PreferencePair, Prompt, Turn
from rlhf_core.errors import DataError

CHAT = Conversation((Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "and?"), Turn("assistant", "there")))
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def trained_spans(tok, labels: list[int]) -> list[str]:
    """Decode each maximal run of trained (not -100) labels."""
    spans, run = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def test_smollm2_tokenizer_is_chatml_with_pad_equal_to_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id


def test_multi_turn_sft_trains_each_reply_and_its_end_of_turn_once(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, labels, truncated = encode_sft(tok, CHAT, 512)
    assert trained_spans(tok, labels) == ["hello<|im_end|>", "there<|im_end|>"]
    # the input is exactly the template's rendering: no second <|im_end|> anywhere
    assert tok.decode(ids) == (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                               "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\nthere<|im_end|>\n")
    assert ids.count(tok.eos_token_id) == 5 and not truncated
    assert len(ids) == len(labels)


def test_preference_responses_end_with_one_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pair = PreferencePair((Turn("user", "Capital of France?"),), "Paris.", "Lyon, I think.", group=1)
    row, truncated = encode_preference(tok, pair, TokenizeConfig(max_length=256, max_response_length=64))
    assert tok.decode(row["chosen_ids"]) == "Paris.<|im_end|>"
    assert tok.decode(row["rejected_ids"]) == "Lyon, I think.<|im_end|>"
    assert tok.decode(row["prompt_ids"]) == SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert not truncated


def test_prompt_ends_with_the_generation_prompt_and_no_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, truncated = encode_prompt(tok, Prompt((Turn("system", "Be brief."), Turn("user", "hi"))), 256)
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not truncated


@pytest.fixture
def history_rewriting(smollm2_tokenizer):
    """A template that shortens earlier assistant turns, as templates that drop past reasoning do."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier reply){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_template_that_rewrites_history_is_refused(history_rewriting):
    with pytest.raises(TemplateError, match=r"not a token prefix.*rewrites earlier turns.*\[chat_template_prefix\]"):
        encode_sft(history_rewriting, CHAT, 512)
    # a single-turn chat is fine under the same template
    ids, labels, _ = encode_sft(history_rewriting, Conversation(CHAT.turns[:2]), 512)
    assert trained_spans(history_rewriting, labels) == ["hello<|im_end|>"]


def test_tokenize_names_file_and_line_of_a_template_problem(history_rewriting, tmp_path):
    convs = [Conversation(CHAT.turns[:2], line=1), Conversation(CHAT.turns, line=2)]
    with pytest.raises(DataError, match=r"^data/chats\.jsonl:2: .*\[chat_template_prefix\]"):
        tokenize_datasets(history_rewriting, TokenizeConfig(max_length=256, eval_fraction=0.0), tmp_path / "tok",
                          conversations=convs, sources={"sft": "data/chats.jsonl"})
    assert not (tmp_path / "tok").exists()


def test_default_template_closes_turns_with_the_tokenizers_own_eos(smollm2_tokenizer, tmp_path):
    """A base model without a template gets the default one, closed by *its* EOS (a special
    token), not by the tiny tokenizer's `<|endoftext|>` as plain text."""
    from rlhf_core.data.tokenizer import load_tokenizer

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    base = load_tokenizer(tmp_path)
    ids, labels, _ = encode_sft(base, Conversation(CHAT.turns[:2]), 512)
    assert trained_spans(base, labels) == ["hello<|im_end|>"]
    assert "<|endoftext|>" not in base.decode(ids)
