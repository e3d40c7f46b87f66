"""Every accepted shape, read from a file of its own and tokenised with a real chat template
(SmolLM2-135M-Instruct's ChatML): the trained tokens are exactly the assistant's replies and
function calls, each through its end-of-turn token; tool results are masked like user turns."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import TokenizeConfig
from rlhf_core.data import formats
from rlhf_core.data.encoding import encode_preference, encode_prompt, encode_sft

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CFG = TokenizeConfig(max_length=512, max_response_length=128)
CALL = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
TOOLS = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]


def _read(tmp_path: Path, read, record: dict):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record], indent=1), encoding="utf-8")  # a JSON array, as LLaMA-Factory ships
    return read(path)


def trained(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


SFT = [
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                    {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]},
     "Hello!<|im_end|>4.<|im_end|>"),
    ("sharegpt_tools", {"conversations": [{"from": "human", "value": "What is 2+3?"},
                                          {"from": "function_call", "value": CALL},
                                          {"from": "observation", "value": '{"result": 5}'},
                                          {"from": "gpt", "value": "It is 5."}], "tools": json.dumps(TOOLS)},
     CALL + "<|im_end|>It is 5.<|im_end|>"),
    ("messages_parts", {"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
     "Blue.<|im_end|>"),
    ("alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "",
                "history": [["Hi", "Hello"]]},
     "Hello<|im_end|>5<|im_end|>"),
]


@pytest.mark.parametrize("name,record,want", SFT, ids=[s[0] for s in SFT])
def test_sft_shapes_train_exactly_the_replies(tmp_path, smollm2_tokenizer, name, record, want):
    [conv] = _read(tmp_path, formats.read_conversations, record)
    ids, labels, _ = encode_sft(smollm2_tokenizer, conv, 512)
    assert trained(smollm2_tokenizer, ids, labels) == want


def test_observation_is_rendered_as_a_tool_turn_and_masked(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    [conv] = _read(tmp_path, formats.read_conversations, SFT[1][1])
    ids, labels, _ = encode_sft(tok, conv, 512)
    assert tok.decode(ids) == (SYSTEM + "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n" + CALL +
                               '<|im_end|>\n<|im_start|>tool\n{"result": 5}<|im_end|>\n'
                               "<|im_start|>assistant\nIt is 5.<|im_end|>\n")
    masked = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert '<|im_start|>tool\n{"result": 5}<|im_end|>' in masked


def test_tools_reach_a_template_that_renders_them(tmp_path, smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    [conv] = _read(tmp_path, formats.read_conversations, SFT[1][1])
    ids, labels, _ = encode_sft(tok, conv, 512)
    assert tok.decode(ids).startswith("<|im_start|>system\nTools: " + json.dumps(TOOLS, sort_keys=True) + "<|im_end|>\n")
    assert trained(tok, ids, labels) == CALL + "<|im_end|>It is 5.<|im_end|>"  # the schemas are context only


HH = "\n\nHuman: What is a pen?\n\nAssistant: A tool.\n\nHuman: For what?\n\nAssistant: "
PREFERENCE = [
    ("question", {"system": "", "history": [], "question": "Capital of France?", "response_chosen": "Paris.",
                  "response_rejected": "Rome."}, "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("trl", {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("trl_conversational", {"prompt": [{"role": "user", "content": "Capital of France?"}],
                            "chosen": [{"role": "assistant", "content": "Paris."}],
                            "rejected": [{"role": "assistant", "content": "Rome."}]},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("ranking", {"prompt": "Capital of France?", "responses": ["Paris.", "Rome."]},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("sharegpt_pair", {"conversations": [{"from": "human", "value": "Capital of France?"}],
                       "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Rome."}},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("sharegpt_pair_strings", {"conversations": [{"from": "human", "value": "Capital of France?"}],
                               "chosen": "Paris.", "rejected": "Rome."},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("alpaca_pair", {"instruction": "Capital of France?", "input": "", "chosen": "Paris.", "rejected": "Rome."},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("implicit_messages", {"chosen": [{"role": "user", "content": "Capital of France?"},
                                      {"role": "assistant", "content": "Paris."}],
                           "rejected": [{"role": "user", "content": "Capital of France?"},
                                        {"role": "assistant", "content": "Rome."}]},
     "<|im_start|>user\nCapital of France?<|im_end|>\n", "Paris.", "Rome."),
    ("implicit_hh_transcript", {"chosen": HH + "Writing.", "rejected": HH + "Nothing."},
     "<|im_start|>user\nWhat is a pen?<|im_end|>\n<|im_start|>assistant\nA tool.<|im_end|>\n"
     "<|im_start|>user\nFor what?<|im_end|>\n", "Writing.", "Nothing."),
]


@pytest.mark.parametrize("name,record,prompt,chosen,rejected", PREFERENCE, ids=[p[0] for p in PREFERENCE])
def test_preference_shapes_tokenise_prompt_and_replies(tmp_path, smollm2_tokenizer, name, record, prompt, chosen,
                                                       rejected):
    tok = smollm2_tokenizer
    [pair] = _read(tmp_path, formats.read_preferences, record)
    row, _ = encode_preference(tok, pair, CFG)
    assert tok.decode(row["prompt_ids"]) == SYSTEM + prompt + "<|im_start|>assistant\n"
    assert tok.decode(row["chosen_ids"]) == chosen + "<|im_end|>"
    assert tok.decode(row["rejected_ids"]) == rejected + "<|im_end|>"
    # and the same record as a prompt for PPO renders exactly the same prompt tokens
    [p] = _read(tmp_path, formats.read_prompts, record)
    assert encode_prompt(tok, p, 512)[0] == row["prompt_ids"]


def test_prompts_from_sft_shapes(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    [p] = _read(tmp_path, formats.read_prompts, SFT[3][1])
    assert tok.decode(encode_prompt(tok, p, 512)[0]) == (
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>\n<|im_start|>assistant\n")


def test_tokenized_checks_report_the_trainable_share_per_file(tmp_path, smollm2_tokenizer):
    from rlhf_core.data.encoding import tokenize_datasets
    from rlhf_core.data.formats import Conversation, PreferencePair, Turn
    from tasks.validation import tokenized_checks

    tok = smollm2_tokenizer
    convs = [Conversation((Turn("user", "hi"), Turn("assistant", "hello")), line=n) for n in (1, 2)]
    pairs = [PreferencePair((Turn("user", f"q{n}"),), "yes", "no", n) for n in (1, 2)]
    cfg = TokenizeConfig(max_length=512, max_response_length=128, eval_fraction=0.5)
    tokenize_datasets(tok, cfg, tmp_path / "tok", conversations=convs, preferences=pairs)
    checks = tokenized_checks(tmp_path / "tok", {"sft": "data/mine/sft.json", "preference": "data/mine/dpo.json"})
    # naive count: the whole rendered chat vs the reply and its end-of-turn token
    total = len(tok(SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
                    add_special_tokens=False)["input_ids"])
    reply = len(tok("hello<|im_end|>", add_special_tokens=False)["input_ids"])
    assert checks["sft"] == {"source": "data/mine/sft.json", "rows": 1, "records_dropped": 0, "labels_aligned": True,
                             "trainable_share": round(reply / total, 4), "rows_nothing_to_train": 0}
    assert checks["preference"] == {"source": "data/mine/dpo.json", "rows": 1, "records_dropped": 0,
                                    "identical_pairs": 0}
