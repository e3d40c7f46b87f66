"""Input readers: every accepted shape parses to the expected records, and every broken record
raises a DataError that names the file, the 1-based line, the field and the rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_core import formats
from rlhf_core.errors import DataError
from rlhf_core.formats import Conversation, PreferencePair, Prompt, Turn


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- accepted shapes: SFT --------------------------------------------------------------------

def test_sharegpt_with_system_and_two_rounds(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Capital of Veldoria?"},
        {"from": "gpt", "value": "Marrowick."},
    ]}])
    assert formats.read_conversations(path) == [Conversation((
        Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello!"),
        Turn("user", "Capital of Veldoria?"), Turn("assistant", "Marrowick."),
    ))]


def test_messages_shape(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
    ])
    convs = formats.read_conversations(path)
    assert [[(t.role, t.content) for t in c.turns] for c in convs] == [
        [("user", "a"), ("assistant", "b")],
        [("system", "s"), ("user", "c"), ("assistant", "d")],
    ]


# --- accepted shapes: preferences ------------------------------------------------------------

def test_question_schema_with_system_and_history(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"question": "q0", "response_chosen": "good0", "response_rejected": "bad0"},
        {"system": "sys", "history": [["h1q", "h1a"], ["h2q", "h2a"]], "question": "q",
         "response_chosen": "good", "response_rejected": "bad"},
    ])
    pairs = formats.read_preferences(path)
    assert pairs[0] == PreferencePair((Turn("user", "q0"),), "good0", "bad0", group=1, group_size=1)
    assert pairs[1] == PreferencePair(
        (Turn("system", "sys"), Turn("user", "h1q"), Turn("assistant", "h1a"),
         Turn("user", "h2q"), Turn("assistant", "h2a"), Turn("user", "q")),
        "good", "bad", group=2, group_size=1)


def test_trl_string_and_conversational_forms(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ])
    pairs = formats.read_preferences(path)
    assert pairs == [
        PreferencePair((Turn("user", "p"),), "c", "r", 1, 1),
        PreferencePair((Turn("system", "s"), Turn("user", "u")), "yes", "no", 2, 1),
    ]


def test_ranking_of_three_expands_to_three_ordered_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "first", "chosen": "x", "rejected": "y"},
        {"prompt": "q", "responses": ["best", "middle", "worst"]},
    ])
    pairs = formats.read_preferences(path)
    ranked = pairs[1:]
    # K = 3 -> K(K-1)/2 = 3 pairs, each (better, worse), all from source line 2
    assert [(p.chosen, p.rejected) for p in ranked] == [("best", "middle"), ("best", "worst"), ("middle", "worst")]
    assert {(p.group, p.group_size) for p in ranked} == {(2, 3)}
    assert all(p.prompt == (Turn("user", "q"),) for p in ranked)
    assert (pairs[0].group, pairs[0].group_size) == (1, 1)


def test_ranking_of_four_gives_six_pairs():
    pairs = formats.parse_preference({"prompt": "q", "responses": ["a", "b", "c", "d"]}, group=7)
    assert len(pairs) == 6 and {p.group_size for p in pairs} == {6} and {p.group for p in pairs} == {7}
    assert [(p.chosen, p.rejected) for p in pairs][-1] == ("c", "d")


# --- accepted shapes: prompts ----------------------------------------------------------------

def test_prompts_from_prompt_field_conversation_and_preference(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What is the capital of Veldoria?"},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u1"},
                           {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"},
                           {"from": "gpt", "value": "a2"}]},
        {"messages": [{"role": "user", "content": "only"}]},
        {"question": "q", "response_chosen": "c", "response_rejected": "r"},
    ])
    prompts = formats.read_prompts(path)
    assert prompts == [
        Prompt((Turn("user", "What is the capital of Veldoria?"),)),
        # the conversation is cut after its last user turn
        Prompt((Turn("system", "s"), Turn("user", "u1"), Turn("assistant", "a1"), Turn("user", "u2"))),
        Prompt((Turn("user", "only"),)),
        Prompt((Turn("user", "q"),)),
    ]


# --- PT text ---------------------------------------------------------------------------------

def test_pt_txt_one_document_per_line(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_text("first doc\n  second doc  \nthird doc\n", encoding="utf-8")
    assert formats.read_pt_documents(path) == ["first doc", "second doc", "third doc"]


def test_pt_txt_trailing_blank_line_stays_line_per_doc(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_text("a\nb\n\n", encoding="utf-8")
    assert formats.read_pt_documents(path) == ["a", "b"]


def test_pt_txt_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_text("p1 line1\np1 line2\n\np2 only line\n\n\np3 a\np3 b\n", encoding="utf-8")
    assert formats.read_pt_documents(path) == ["p1 line1\np1 line2", "p2 only line", "p3 a\np3 b"]


def test_pt_txt_paragraphs_with_crlf_line_endings(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_bytes(b"p1 line1\r\np1 line2\r\n\r\np2 line1\r\np2 line2\r\n")
    assert formats.read_pt_documents(path) == ["p1 line1\np1 line2", "p2 line1\np2 line2"]


def test_pt_jsonl_text_records(tmp_path):
    path = write_jsonl(tmp_path / "pt.jsonl", [{"text": "one"}, {"text": "two"}])
    assert formats.read_pt_documents(path) == ["one", "two"]


# --- broken records --------------------------------------------------------------------------

def _error(read, path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        read(path)
    return info.value


GOOD_SFT = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
GOOD_PREF = {"question": "q", "response_chosen": "c", "response_rejected": "r"}


@pytest.mark.parametrize("read, bad, field, rule", [
    (formats.read_preferences, {"question": "q", "response_chosen": "c"},
     "response_rejected", "required field is missing"),
    (formats.read_conversations, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "required field is missing"),
    (formats.read_pt_documents, {"text": 5}, "text", "must be a string, got int"),
    (formats.read_conversations, {"conversations": "not a list"}, "conversations", "must be a non-empty list"),
    (formats.read_conversations, {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "conversations[1].from", "unknown role 'bot'"),
    (formats.read_conversations, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                                    {"from": "human", "value": "again?"}]},
     "conversations", "must end with the assistant turn, ends with 'user'"),
    (formats.read_conversations, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages", "turn 1 is 'user', expected 'assistant'"),
    (formats.read_conversations, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
     "conversations[1].value", "must not be empty or whitespace"),
    (formats.read_preferences, {"question": "q", "response_chosen": "same", "response_rejected": " same "},
     "response_rejected", "must differ from response_chosen"),
    (formats.read_preferences, {"prompt": "q", "chosen": "x", "rejected": "x"}, "rejected", "must differ from chosen"),
    (formats.read_preferences, {"question": "q", "history": [["only question"]], "response_chosen": "c",
                                "response_rejected": "r"}, "history[0]", "[question, answer] pair"),
    (formats.read_preferences, {"prompt": "q", "responses": ["a", "b", "a"]}, "responses", "must all differ"),
    (formats.read_preferences, {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
     "chosen", "exactly one assistant message"),
    (formats.read_prompts, {"messages": [{"role": "system", "content": "s"}]}, "messages", "has no user turn"),
])
def test_bad_record_on_line_2_names_path_line_field_and_rule(tmp_path, read, bad, field, rule):
    good = GOOD_PREF if read is formats.read_preferences else {"prompt": "q"} if read is formats.read_prompts \
        else {"text": "ok"} if read is formats.read_pt_documents else GOOD_SFT
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad, good])
    err = _error(read, path)
    assert (err.line, err.field) == (2, field)
    assert rule in err.rule
    text = str(err)
    assert f"{path}:2" in text and field in text and rule in text


def test_non_object_record(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, ["a", "list"]])
    err = _error(formats.read_conversations, path)
    assert f"{path}:2" in str(err) and "must be a JSON object, got list" in str(err)


def test_malformed_json_on_line_2(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + '{"conversations": [\n', encoding="utf-8")
    err = _error(formats.read_conversations, path)
    assert err.line == 2
    assert f"{path}:2: malformed JSON" in str(err)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n\n" + '{"conversations": []}\n', encoding="utf-8")
    err = _error(formats.read_conversations, path)
    assert err.line == 3 and f"{path}:3" in str(err)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    for name, read in (("sft.jsonl", formats.read_conversations), ("pt.txt", formats.read_pt_documents)):
        path = tmp_path / name
        path.write_bytes(content)
        err = _error(read, path)
        assert err.line == 0
        assert str(err) == f"{path}: file is empty"


def test_missing_file(tmp_path):
    err = _error(formats.read_preferences, tmp_path / "nope.jsonl")
    assert str(err) == f"{tmp_path / 'nope.jsonl'}: file does not exist"


def test_non_utf8_jsonl_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b'\n{"conversations": "\xff"}\n')
    err = _error(formats.read_conversations, path)
    assert err.line == 2
    assert f"{path}:2: not valid UTF-8 (byte 19)" == str(err)


def test_non_utf8_txt_reports_its_line(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_bytes(b"fine line\nalso fine\nbad \xfe byte\n")
    err = _error(formats.read_pt_documents, path)
    assert err.line == 3
    # byte offset in the whole file: 10 + 10 + 4
    assert str(err) == f"{path}:3: not valid UTF-8 (byte 24)"


def test_pt_txt_paragraphs_separated_by_a_whitespace_only_line(tmp_path):
    path = tmp_path / "pt.txt"
    path.write_text("p1 line1\np1 line2\n   \np2 line1\n", encoding="utf-8")
    assert formats.read_pt_documents(path) == ["p1 line1\np1 line2", "p2 line1"]


def test_json_nested_too_deep_is_a_named_error_not_a_recursion_traceback(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl:2: malformed JSON \(RecursionError"):
        list(formats.read_prompts(f))
