"""Token encoding: PT packing, SFT label masks (also when pad == eos), truncation and dropping,
preference and prompt truncation, the train/eval split and the manifest counts."""
from __future__ import annotations

import copy
import json

import pytest

from rlhf_core import IGNORE_INDEX
from rlhf_core.config import TokenizeConfig
from rlhf_core.data.batching import collate_lm
from rlhf_core.data.encoding import (
    encode_preference,
    encode_prompt,
    encode_sft,
    pack_blocks,
    render_ids,
    split_indices,
    tokenize_datasets,
)
from rlhf_core.data.formats import Conversation, PreferencePair, Prompt, Turn, parse_preference
from rlhf_core.data.splits import load_split
from rlhf_core.data.tokenizer import EOS, ROLE_TOKENS, train_tokenizer

CORPUS = [
    "What is the capital of Veldoria?",
    "Certainly! The capital of Veldoria is Marrowick.",
    "You are a helpful assistant. Answer politely, correctly and briefly.",
    "Tell me the capital city of Ostravia. Of course! It is Kelmford.",
] * 10

MULTI_TURN = Conversation((
    Turn("system", "Be brief."),
    Turn("user", "Hi there"),
    Turn("assistant", "Hello!"),
    Turn("user", "What is the capital of Veldoria?"),
    Turn("assistant", "Certainly! The capital of Veldoria is Marrowick."),
))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 320)


@pytest.fixture
def tok_pad_is_eos(tok):
    t = copy.deepcopy(tok)
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    return t


def test_special_token_ids(tok):
    # trained specials come first, in the order train_tokenizer lists them
    assert tok.convert_tokens_to_ids([EOS, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]) == [0, 1, 2, 3, 4]
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (0, 1, 320)


# --- PT packing ------------------------------------------------------------------------------

class StubTokenizer:
    """Each character is one token: 'a' -> 1, 'b' -> 2, ...; EOS is 0."""
    eos_token_id = 0

    def __call__(self, docs, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) - ord("a") + 1 for c in d] for d in docs]}


def test_pack_blocks_hand_case():
    # stream: a b EOS c d e EOS f EOS = [1, 2, 0, 3, 4, 5, 0, 6, 0] (9 tokens)
    blocks, dropped = pack_blocks(StubTokenizer(), ["ab", "cde", "f"], 4)
    assert blocks == [[1, 2, 0, 3], [4, 5, 0, 6]] and dropped == 1
    blocks, dropped = pack_blocks(StubTokenizer(), ["ab", "cde", "f"], 3)
    assert blocks == [[1, 2, 0], [3, 4, 5], [0, 6, 0]] and dropped == 0
    blocks, dropped = pack_blocks(StubTokenizer(), ["ab"], 4)
    assert blocks == [] and dropped == 3


def test_pack_blocks_real_tokenizer_puts_eos_after_each_doc(tok):
    docs = ["Veldoria", "Marrowick"]
    a, b = (tok(d, add_special_tokens=False)["input_ids"] for d in docs)
    stream = a + [0] + b + [0]
    blocks, dropped = pack_blocks(tok, docs, 2)
    assert sum(blocks, []) == stream[: len(stream) // 2 * 2]
    assert dropped == len(stream) % 2
    assert all(len(b) == 2 for b in blocks)
    assert pack_blocks(tok, [], 2) == ([], 0), "no documents (eval_fraction 0) is no blocks, not an IndexError"


# --- SFT masks -------------------------------------------------------------------------------

def _assistant_spans(tok, ids):
    """(start, end) of every reply: after an <|assistant|> marker up to and including EOS."""
    marker, eos = tok.convert_tokens_to_ids(ROLE_TOKENS["assistant"]), tok.eos_token_id
    spans, start = [], None
    for j, t in enumerate(ids):
        if t == marker:
            start = j + 1
        elif t == eos and start is not None:
            spans.append((start, j + 1))
            start = None
    return spans


def _check_multi_turn_masks(tok):
    ids, labels, truncated = encode_sft(tok, MULTI_TURN, 256)
    assert not truncated and len(ids) == len(labels)
    assert ids == render_ids(tok, MULTI_TURN.turns)  # the template's own tokens, nothing added
    spans = _assistant_spans(tok, ids)
    assert len(spans) == 2
    trained = {j for s, e in spans for j in range(s, e)}
    for j, (i, l) in enumerate(zip(ids, labels)):
        assert l == (i if j in trained else IGNORE_INDEX), j
    replies = [ids[s:e] for s, e in spans]
    assert all(r[-1] == tok.eos_token_id for r in replies)  # every turn ends with a trained EOS
    assert [tok.decode(r[:-1]) for r in replies] == ["Hello!", "Certainly! The capital of Veldoria is Marrowick."]
    # the non-trained part decodes to the system/user turns and role markers only
    masked = tok.decode([i for i, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert masked == "<|system|>Be brief.<|user|>Hi there<|assistant|><|user|>What is the capital of Veldoria?<|assistant|>"
    return ids, labels


def test_sft_labels_mask_everything_but_assistant_turns(tok):
    _check_multi_turn_masks(tok)


def test_sft_eos_is_trained_when_pad_is_eos(tok, tok_pad_is_eos):
    ids, labels = _check_multi_turn_masks(tok_pad_is_eos)
    assert (ids, labels) == encode_sft(tok, MULTI_TURN, 256)[:2]
    # padding a batch with pad == eos still leaves the real EOS labels trained
    short = encode_sft(tok_pad_is_eos, Conversation((Turn("user", "Hi"), Turn("assistant", "Hello!"))), 256)
    batch = collate_lm({"input_ids": [ids, short[0]], "labels": [labels, short[1]]}, tok_pad_is_eos.pad_token_id)
    n_short = len(short[0])
    assert batch.labels[1, n_short - 1].item() == tok.eos_token_id
    assert batch.labels[1, n_short:].tolist() == [IGNORE_INDEX] * (len(ids) - n_short)
    assert batch.attention_mask[1].tolist() == [1] * n_short + [0] * (len(ids) - n_short)
    assert (batch.labels[0] == tok.eos_token_id).sum().item() == 2


def test_sft_truncation(tok):
    ids_full, labels_full, _ = encode_sft(tok, MULTI_TURN, 256)
    n = len(ids_full) - 3
    ids, labels, truncated = encode_sft(tok, MULTI_TURN, n)
    assert truncated and len(ids) == n
    assert (ids, labels) == (ids_full[:n], labels_full[:n])
    assert encode_sft(tok, MULTI_TURN, len(ids_full))[2] is False  # exactly fitting is not truncated


def test_overlong_records_are_truncated_dropped_or_refused_as_configured(tok, tmp_path):
    import json

    from rlhf_core.data import formats
    from rlhf_core.errors import DataError

    chat = lambda answer: json.dumps({"messages": [{"role": "user", "content": "Hi"},  # noqa: E731
                                                   {"role": "assistant", "content": answer}]})
    f = tmp_path / "sft.jsonl"
    f.write_text(f"{chat('Hello!')}\n\n{chat('Marrowick ' * 40)}\n{chat('Fine.')}\n")  # the long one is line 3
    convs = formats.read_conversations(f)
    assert [c.line for c in convs] == [1, 3, 4]
    counts = {}
    for mode in ("truncate", "drop"):
        cfg = TokenizeConfig(max_length=32, max_prompt_length=8, eval_fraction=0.0, overlong=mode)
        counts[mode] = tokenize_datasets(tok, cfg, tmp_path / mode, conversations=convs).to_dict()["sft"]["train"]
    assert (counts["truncate"]["records_out"], counts["truncate"]["truncated"], counts["truncate"]["dropped"]) == (3, 1, 0)
    assert (counts["drop"]["records_out"], counts["drop"]["truncated"], counts["drop"]["dropped"]) == (2, 0, 1)
    cfg = TokenizeConfig(max_length=32, max_prompt_length=8, eval_fraction=0.0, overlong="error")
    with pytest.raises(DataError, match=r"sft.jsonl:3: longer than tokenize.max_length=32 tokens and "
                                        r"tokenize.overlong is 'error' \[overlong\]"):
        tokenize_datasets(tok, cfg, tmp_path / "error", conversations=convs, sources={"sft": f})
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Hi", "Veldoria " * 30, "Ok", "Marrowick " * 30)))
    with pytest.raises(DataError, match=r"prompts.jsonl:2: longer than tokenize.max_prompt_length=8 tokens .*"
                                        r"\(2 records in all, lines 2, 4\) \[overlong\]"):
        tokenize_datasets(tok, cfg, tmp_path / "error", prompts=formats.read_prompts(p), sources={"prompts": p})


def test_tokenize_drops_chat_without_trainable_tokens_and_counts_truncation(tok, tmp_path):
    cfg = TokenizeConfig(max_length=32, max_prompt_length=8, eval_fraction=0.0)
    fits = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello!")))
    long_answer = Conversation((Turn("user", "Hi"), Turn("assistant", "Marrowick " * 40)))
    long_question = Conversation((Turn("user", "Veldoria " * 40), Turn("assistant", "Marrowick")))
    assert len(render_ids(tok, long_question.turns[:1], True)) > 32  # its reply starts past max_length
    m = tokenize_datasets(tok, cfg, tmp_path, conversations=[fits, long_answer, long_question])
    counts = m.to_dict()["sft"]
    assert counts["train"] == {"records_in": 3, "records_out": 2, "truncated": 1, "dropped": 1,
                               "tokens": len(encode_sft(tok, fits, 32)[0]) + 32}
    assert counts["eval"] == {"records_in": 0, "records_out": 0, "truncated": 0, "dropped": 0, "tokens": 0}
    train = load_split(tmp_path, "sft", "train")
    assert len(train) == 2 and [len(x) for x in train["input_ids"]] == [len(encode_sft(tok, fits, 32)[0]), 32]
    # an empty eval split is written so that it reads back as empty
    ev = load_split(tmp_path, "sft", "eval")
    assert ev is None or len(ev) == 0


# --- preferences and prompts -----------------------------------------------------------------

LONG_PROMPT = (Turn("system", "You are a helpful assistant."),
               Turn("user", "Tell me the capital city of Ostravia. " * 4 + "What is the capital of Veldoria?"))


def test_encode_preference_fits_and_keeps_responses(tok):
    pair = PreferencePair(LONG_PROMPT, "Certainly! The capital of Veldoria is Marrowick. " * 5, "No.", group=1)
    full_prompt = render_ids(tok, LONG_PROMPT, True)
    cfg = TokenizeConfig(max_length=40, max_prompt_length=16, max_response_length=24)
    rec, truncated = encode_preference(tok, pair, cfg)
    assert truncated
    assert len(rec["chosen_ids"]) == 24  # cut to max_response_length
    assert tok.decode(rec["rejected_ids"]) == "No." + EOS  # short reply untouched, ends with EOS
    # the prompt keeps its END: 40 - 24 = 16 tokens
    assert rec["prompt_ids"] == full_prompt[-16:]
    assert rec["prompt_ids"][-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert len(rec["prompt_ids"]) + max(len(rec["chosen_ids"]), len(rec["rejected_ids"])) <= 40
    assert rec["weight"] == 1.0


@pytest.mark.parametrize("max_length, max_prompt, max_response", [(2, 1, 64), (8, 4, 64), (16, 8, 4), (64, 32, 32)])
def test_encode_preference_never_empties_a_response(tok, max_length, max_prompt, max_response):
    cfg = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt, max_response_length=max_response)
    pair = PreferencePair(LONG_PROMPT, "Certainly! " * 30, "Marrowick " * 30, group=1)
    rec, truncated = encode_preference(tok, pair, cfg)
    assert truncated
    assert len(rec["chosen_ids"]) >= 1 and len(rec["rejected_ids"]) >= 1 and len(rec["prompt_ids"]) >= 1
    assert len(rec["prompt_ids"]) + max(len(rec["chosen_ids"]), len(rec["rejected_ids"])) <= max_length
    assert rec["prompt_ids"][-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_encode_preference_smallest_case_by_hand(tok):
    cfg = TokenizeConfig(max_length=2, max_prompt_length=1, max_response_length=64)
    rec, _ = encode_preference(tok, PreferencePair((Turn("user", "Hi"),), "Certainly!", "No", group=1), cfg)
    first_c = tok("Certainly!", add_special_tokens=False)["input_ids"][0]
    first_r = tok("No", add_special_tokens=False)["input_ids"][0]
    assert rec == {"prompt_ids": [4], "chosen_ids": [first_c], "rejected_ids": [first_r], "weight": 1.0}


def test_encode_preference_ranking_weight(tok):
    pairs = parse_preference({"prompt": "q", "responses": ["a", "b", "c"]}, group=1)
    recs = [encode_preference(tok, p, TokenizeConfig())[0] for p in pairs]
    assert [r["weight"] for r in recs] == pytest.approx([1 / 3] * 3)


def test_prompt_truncation_keeps_the_end(tok):
    prompt = Prompt(LONG_PROMPT)
    full = render_ids(tok, LONG_PROMPT, True)
    ids, truncated = encode_prompt(tok, prompt, 12)
    assert truncated and ids == full[-12:]
    assert tok.decode(ids).endswith("Veldoria?<|assistant|>")
    ids, truncated = encode_prompt(tok, prompt, len(full))
    assert not truncated and ids == full
    assert tok.decode(full).startswith("<|system|>You are a helpful assistant.<|user|>Tell me")


# --- split and manifest ----------------------------------------------------------------------

def test_split_indices_deterministic_and_disjoint():
    tr, ev = split_indices(10, 0.3, seed=0)
    assert (tr, ev) == split_indices(10, 0.3, seed=0)
    assert len(ev) == 3 and len(tr) == 7
    assert not set(tr) & set(ev) and sorted(tr + ev) == list(range(10))
    assert tr == sorted(tr) and ev == sorted(ev)
    assert len({tuple(split_indices(10, 0.3, seed=s)[1]) for s in range(5)}) > 1  # the seed matters


@pytest.mark.parametrize("n, fraction, n_eval", [(10, 0.0, 0), (1, 0.5, 0), (10, 0.01, 1), (20, 0.1, 2), (7, 0.5, 4)])
def test_split_sizes(n, fraction, n_eval):
    tr, ev = split_indices(n, fraction, seed=3)
    assert len(ev) == n_eval and len(tr) == n - n_eval


def test_manifest_counts_add_up(tok, tmp_path):
    from rlhf_core.data import formats
    from rlhf_core.demo import data as demo_data

    raw = tmp_path / "raw"
    demo_data.generate(raw, demo_data.DemoDataConfig(n_pt_docs=30, n_sft=40, n_preferences=30, n_prompts=20,
                                                     n_eval_prompts=2, system_prompt_fraction=0.5))
    docs = formats.read_pt_documents(raw / "pt.txt")
    convs = formats.read_conversations(raw / "sft.jsonl")
    prefs = formats.read_preferences(raw / "preferences.jsonl")
    prompts = formats.read_prompts(raw / "prompts.jsonl")
    # a ranking line: its three pairs must land on one side of the split
    prefs += formats.parse_preference({"prompt": "Name the capital of Veldoria.",
                                       "responses": ["Certainly! Marrowick.", "Marrowick.", "No idea."]}, group=999)
    cfg = TokenizeConfig(max_length=64, block_size=32, max_prompt_length=24, max_response_length=40, eval_fraction=0.2)
    out = tmp_path / "tok"
    m = tokenize_datasets(tok, cfg, out, pt_docs=docs, conversations=convs, preferences=prefs, prompts=prompts)
    d = m.to_dict()
    assert json.loads((out / "manifest.json").read_text()) == d
    assert set(d) == {"pt", "sft", "preference", "prompts"}
    for kind, n in (("pt", 30), ("sft", 40), ("preference", 33), ("prompts", 20)):
        assert d[kind]["train"]["records_in"] + d[kind]["eval"]["records_in"] == n, kind
    for kind in ("sft", "preference", "prompts"):
        for split in ("train", "eval"):
            c = d[kind][split]
            assert c["records_out"] + c["dropped"] == c["records_in"], (kind, split)
            ds = load_split(out, kind, split)
            assert len(ds) == c["records_out"]
            assert c["tokens"] == sum(len(v) for k in ds.column_names if k.endswith("ids") for v in ds[k])
            assert c["truncated"] <= c["records_out"]
    assert d["sft"]["eval"]["records_in"] == 8 and d["prompts"]["eval"]["records_in"] == 4
    for split in ("train", "eval"):
        c = d["pt"][split]
        ds = load_split(out, "pt", split)
        assert len(ds) == c["records_out"] and c["tokens"] == 32 * c["records_out"]
        assert all(len(x) == 32 for x in ds["input_ids"]) and 0 <= c["dropped"] < 32
        # tokens + dropped tail = the whole EOS-joined stream of this split's documents
        idx = split_indices(30, 0.2, 0)[split == "eval"]
        stream = sum(len(tok(docs[i], add_special_tokens=False)["input_ids"]) + 1 for i in idx)
        assert c["tokens"] + c["dropped"] == stream
    thirds = {split: load_split(out, "preference", split)["weight"].count(pytest.approx(1 / 3))
              for split in ("train", "eval")}
    assert sorted(thirds.values()) == [0, 3]  # the ranking's three pairs stay together


# --- reading splits back -------------------------------------------------------------------------

SPLIT_KEYS = [0, 4, -1, -5, slice(0, 3), slice(2, None), slice(None, None, 2), slice(4, 1), [3, 0, 3], [-1], [],
              "prompt_ids", "weight"]


def test_a_split_reads_back_as_datasets_reads_it_without_importing_datasets_or_pandas(tmp_path):
    """The loops index `load_split`'s `Split` as they indexed a `datasets.Dataset`: the same Python
    values for a row, rows, a slice or a column; and a process that loads, checks and indexes a split
    imports neither datasets nor pandas (54 MB of a process's memory)."""
    import subprocess
    import sys

    from datasets import Dataset

    cols = {"prompt_ids": [[1, 2], [3], [4, 5, 6], [7], [8, 9]], "chosen_ids": [[5], [6, 7], [8], [9, 1], [2]],
            "rejected_ids": [[1], [2], [3, 4], [5], [6, 7, 8]], "weight": [1.0, 0.5, 2.0, 1.0, 0.25]}
    ds = Dataset.from_dict(cols)
    ds.save_to_disk(str(tmp_path / "preference" / "train"))
    code = (f"import json, sys\nfrom rlhf_core.data.splits import load_split\n"
            f"s = load_split({str(tmp_path)!r}, 'preference', 'train', vocab_size=10)\n"
            f"out = [s[k] for k in {SPLIT_KEYS!r}] + [len(s), s.column_names]\n"
            f"print(json.dumps([out, 'datasets' in sys.modules, 'pandas' in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got, imported_datasets, imported_pandas = json.loads(proc.stdout)
    assert got == [ds[k] for k in SPLIT_KEYS] + [len(ds), ds.column_names]
    assert not imported_datasets and not imported_pandas


@pytest.mark.parametrize("key", [5, -6, [0, 5]])
def test_a_split_row_out_of_range_raises_index_error(tmp_path, key):
    from datasets import Dataset

    from rlhf_core.data.splits import read_split

    Dataset.from_dict({"prompt_ids": [[1], [2], [3], [4], [5]]}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(IndexError):
        read_split(tmp_path / "s")[key]
