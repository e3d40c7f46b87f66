"""The data-quality gate: real Great Expectations runs on tiny files written into tmp_path.

One GX context is created per process (the first test pays the ~4 s import); every later test
reuses it, so the whole file stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_core.errors import ConfigError
from tasks.validation import (
    COLUMNS,
    Failure,
    ValidationLimits,
    ValidationReport,
    check_frame,
    validate_file,
    validate_files,
)


def _write(tmp_path: Path, name: str, lines: list) -> Path:
    """Each item is a JSON-able object (dumped), a str (written as is) or bytes (written raw)."""
    path = tmp_path / name
    out = b""
    for item in lines:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, str):
            out += item.encode("utf-8")
        else:
            out += json.dumps(item).encode("utf-8")
        out += b"\n"
    path.write_bytes(out)
    return path


def _msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."},
                              {"from": "human", "value": "What is 2+2?"},
                              {"from": "gpt", "value": "4."}]}
MESSAGES = _msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a colour."), ("assistant", "Blue."))
QUESTION = {"system": "Be kind.", "history": [["Hi", "Hello!"]], "question": "How are you?",
            "response_chosen": "Fine, thanks.", "response_rejected": "Go away."}
TRL = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
TRL_CHAT = {"prompt": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "No."}]}
RANKING = {"prompt": "Rank me.", "responses": ["best", "middle", "worst"]}

GOOD = [
    ("sft", "sharegpt.jsonl", [SHAREGPT, {"conversations": SHAREGPT["conversations"][1:]}]),
    ("sft", "messages.jsonl", [MESSAGES]),
    ("preference", "question.jsonl", [QUESTION, {"question": "Q?", "response_chosen": "A", "response_rejected": "B"}]),
    ("preference", "trl.jsonl", [TRL, TRL_CHAT]),
    ("preference", "ranking.jsonl", [RANKING]),
    ("prompts", "prompts.jsonl", [{"prompt": "Tell a joke."}, {"prompt": "Name a colour."}]),
    ("prompts", "prompts_trl.jsonl", [TRL]),
    ("prompts", "prompts_messages.jsonl", [MESSAGES]),
    ("prompts", "prompts_sharegpt.jsonl", [SHAREGPT]),
    ("prompts", "prompts_question.jsonl", [QUESTION]),
    ("pt", "docs.jsonl", [{"text": "A document."}, {"text": "Another one."}]),
    ("pt", "lines.txt", ["First document.", "Second document."]),
    ("pt", "paragraphs.txt", ["Para one,", "still one.", "", "Para two."]),
]


@pytest.mark.parametrize("kind,name,lines", GOOD, ids=[g[1] for g in GOOD])
def test_good_files_pass(tmp_path, kind, name, lines):
    report = validate_file(_write(tmp_path, name, lines), kind)
    assert report.success, report.format()
    assert report.failures == [] and report.duplicates == 0
    assert report.rows == (2 if name == "paragraphs.txt" else len(lines))
    names = {e["name"] for e in report.expectations}
    assert {"expect_column_values_to_not_be_null", "expect_table_row_count_to_be_between",
            "expect_column_values_to_match_regex"} <= names
    assert all(e["success"] for e in report.expectations)
    assert "expectations met; " in report.format() and ": OK:" in report.format()


def test_every_kind_lists_its_named_expectations(tmp_path):
    reports = validate_files([(_write(tmp_path, "s.jsonl", [MESSAGES]), "sft"),
                              (_write(tmp_path, "p.jsonl", [TRL]), "preference")])
    sft = {(e["name"], str(e["column"])) for e in reports[0].expectations}
    assert ("expect_column_values_to_be_in_set", "last_role") in sft
    assert ("expect_column_values_to_be_between", "n_turns") in sft
    assert ("expect_column_values_to_be_between", "all_text_chars") in sft
    pref = {(e["name"], str(e["column"])) for e in reports[1].expectations}
    assert ("expect_select_column_values_to_be_unique_within_record", "['chosen', 'rejected']") in pref
    assert ("expect_column_values_to_not_be_null", "rejected") in pref
    bounds = [e["kwargs"] for e in reports[1].expectations if e["name"] == "expect_table_row_count_to_be_between"]
    assert {"min_value": 1} in bounds and {"max_value": 1_000_000} in bounds


GOOD_LINE = {"pt": {"text": "ok"}, "sft": MESSAGES, "preference": TRL, "prompts": {"prompt": "ok"}}

# (id, kind, file name, lines, limits, expected (line, field, expectation, rule fragment))
BAD = [
    ("malformed_json_line3", "sft", "a.jsonl", [MESSAGES, MESSAGES, '{"messages": [', MESSAGES], None,
     (3, None, "record_format", "malformed JSON")),
    ("missing_field", "preference", "a.jsonl", [TRL, {"prompt": "p", "chosen": "c"}], None,
     (2, "rejected", "record_format", "required field is missing")),
    ("number_not_text", "pt", "a.jsonl", [{"text": "fine"}, {"text": 5}], None,
     (2, "text", "record_format", "must be a string, got int")),
    ("list_not_dict", "sft", "a.jsonl", [MESSAGES, {"messages": [["user", "hi"], ["assistant", "yo"]]}], None,
     (2, "messages[0]", "record_format", "must be an object, got list")),
    ("record_is_list", "prompts", "a.jsonl", [{"prompt": "p"}, ["p"]], None,
     (2, "<record>", "record_format", "must be a JSON object, got list")),
    ("whitespace_response", "preference", "a.jsonl", [QUESTION, dict(QUESTION, response_rejected=" \t ")], None,
     (2, "response_rejected", "record_format", "must not be empty or whitespace")),
    ("chosen_equals_rejected", "preference", "a.jsonl", [TRL, dict(TRL, rejected="Hi!")], None,
     (2, "rejected", "record_format", "must differ from chosen")),
    ("unknown_role", "sft", "a.jsonl",
     [SHAREGPT, {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}], None,
     (2, "conversations[1].from", "record_format", "unknown role 'bot'")),
    ("ends_with_user", "sft", "a.jsonl", [MESSAGES, _msgs(("user", "hi"), ("assistant", "yo"), ("user", "and?"))],
     None, (2, "messages", "record_format", "must end with the assistant turn")),
    ("non_utf8_line", "prompts", "a.jsonl", [{"prompt": "p"}, b'{"prompt": "caf\xe9"}'], None,
     (2, None, "record_format", "not valid UTF-8")),
    ("non_utf8_txt", "pt", "a.txt", ["one", "two", b"thr\xffee"], None,
     (3, None, "record_format", "not valid UTF-8")),
    ("too_long_sft_turn", "sft", "a.jsonl", [_msgs(("user", "hi"), ("assistant", "y" * 30))],
     ValidationLimits(max_chars=10),
     (1, "messages[1]", "expect_column_values_to_be_between", "has 30 characters, more than max_chars=10")),
    ("too_long_ranked_response", "preference", "a.jsonl", [RANKING, dict(RANKING, responses=["a", "b" * 30, "c"])],
     ValidationLimits(max_chars=10), (2, "responses[1]", "expect_column_values_to_be_between", "max_chars=10")),
    ("too_long_history", "prompts", "a.jsonl", [dict(QUESTION, history=[["hi", "z" * 30]])],
     ValidationLimits(max_chars=10), (1, "history[0][1]", "expect_column_values_to_be_between", "max_chars=10")),
    ("too_many_turns", "sft", "a.jsonl", [_msgs(("user", "a"), ("assistant", "b")), MESSAGES],
     ValidationLimits(max_turns=3), (2, "n_turns", "expect_column_values_to_be_between", "has 4 turns, more than max_turns=3")),
    ("too_few_rows", "preference", "a.jsonl", [TRL, dict(TRL, prompt="Another.")], ValidationLimits(min_rows=3),
     (0, None, "expect_table_row_count_to_be_between", "has 2 valid records, fewer than min_rows=3")),
    ("too_many_rows", "pt", "a.txt", ["one", "two", "three"], ValidationLimits(max_rows=2),
     (0, None, "expect_table_row_count_to_be_between", "more than max_rows=2")),
    ("empty_file", "sft", "a.jsonl", ["", "  "], None, (0, None, "file_readable", "file is empty")),
    ("empty_txt", "pt", "a.txt", ["", ""], None, (0, None, "file_readable", "file is empty")),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_case_reports_line_field_and_rule(tmp_path, case):
    _, kind, name, lines, limits, (line, field, expectation, fragment) = case
    report = validate_file(_write(tmp_path, name, lines), kind, limits or ValidationLimits())
    assert not report.success
    assert len(report.failures) == 1, report.format()
    failure = report.failures[0]
    assert (failure.line, failure.field, failure.expectation) == (line, field, expectation), report.format()
    assert fragment in failure.rule
    where = f"{report.path}:{line}: " if line else f"{report.path}: "
    assert report.format().splitlines()[0].startswith(where)


def test_chosen_equals_rejected_names_the_gx_expectation(tmp_path):
    report = validate_file(_write(tmp_path, "p.jsonl", [TRL, dict(TRL, rejected="Hi!")]), "preference")
    # The parser stops the record first; the suite still states the rule as a named expectation.
    assert [(f.line, f.field) for f in report.failures] == [(2, "rejected")]
    assert "expect_select_column_values_to_be_unique_within_record" in {e["name"] for e in report.expectations}
    # ...and that expectation really fires on a flattened row where chosen equals rejected.
    frame = pd.DataFrame({"prompt": ["p", "q"], "chosen": ["a", "same"], "rejected": ["b", "same"],
                          "n_turns": [2, 2], "max_chars": [1, 4], "longest_field": ["chosen", "chosen"]},
                         index=[4, 9])
    failures, _ = check_frame("preference", frame)
    assert failures == [Failure(9, "chosen,rejected", "expect_select_column_values_to_be_unique_within_record",
                                "chosen and rejected must differ")]


def test_sft_suite_flags_rows_the_parser_would_reject():
    """The suite's rules work on their own, row by row, mapped back to the index (= file lines)."""
    frame = pd.DataFrame({"first_user": ["hi", "  ", None],
                          "last_role": ["assistant", "user", "assistant"],
                          "n_turns": [2, 2, 2],
                          "roles": ["user,assistant", "user,user", "user,assistant"],
                          "all_text_chars": [2, 2, 2],
                          "longest_field": ["messages[0]"] * 3}, index=[1, 5, 8])
    failures, summary = check_frame("sft", frame, ValidationLimits(min_rows=1))
    got = {(f.line, f.field, f.expectation) for f in failures}
    assert got == {(5, "first_user", "expect_column_values_to_match_regex"),
                   (5, "last_role", "expect_column_values_to_be_in_set"),
                   (5, "roles", "expect_column_values_to_match_regex"),
                   (8, "first_user", "expect_column_values_to_not_be_null")}
    assert any("ends with 'user'" in f.rule for f in failures)
    assert sum(not e["success"] for e in summary) == 4


def test_missing_file(tmp_path):
    report = validate_file(tmp_path / "nope.jsonl", "prompts")
    assert [(f.line, f.field, f.expectation) for f in report.failures] == [(0, None, "file_readable")]
    assert "does not exist" in report.failures[0].rule and report.rows == 0 and report.expectations == []


def test_several_errors_are_all_reported(tmp_path):
    path = _write(tmp_path, "mixed.jsonl", [
        TRL,                                              # 1 ok
        "{oops",                                          # 2 malformed JSON
        dict(TRL, chosen=3),                              # 3 number where text expected
        "",                                               # 4 blank: skipped
        b'{"prompt": "\xff"}',                            # 5 bad UTF-8
        dict(TRL, rejected="Hi!"),                        # 6 chosen == rejected
        dict(TRL, chosen="c" * 50),                       # 7 too long (GX)
        {"prompt": "p"},                                  # 8 missing chosen
        dict(TRL, prompt="Another."),                     # 9 ok
    ])
    report = validate_file(path, "preference", ValidationLimits(max_chars=40))
    got = [(f.line, f.field, f.expectation) for f in report.failures]
    assert got == [(2, None, "record_format"), (3, "chosen", "record_format"), (5, None, "record_format"),
                   (6, "rejected", "record_format"),
                   (7, "chosen", "expect_column_values_to_be_between"), (8, "chosen", "record_format")]
    assert report.rows == 3  # lines 1, 7 and 9 parsed
    text = report.format()
    for line in (2, 3, 5, 6, 7, 8):
        assert f"{path}:{line}: " in text
    assert f"{path}:3: field 'chosen': must be a string, got int [record_format]" in text
    assert text.splitlines()[-1].startswith(f"{path}: preference: FAILED: 3 valid record(s), 6 failure(s)")
    short = report.format(limit=2).splitlines()
    assert len(short) == 4 and short[2] == "... and 4 more failure(s)"


def test_all_lines_bad_still_runs_gx_and_reports_zero_rows(tmp_path):
    report = validate_file(_write(tmp_path, "bad.jsonl", ["nope", "[]"]), "sft")
    assert [(f.line, f.expectation) for f in report.failures] == [
        (0, "expect_table_row_count_to_be_between"), (1, "record_format"), (2, "record_format")]
    assert report.rows == 0


def test_parser_crash_becomes_a_failure_not_an_exception(tmp_path):
    # An unhashable role used to reach `role not in roles` in the parser; whatever it raises,
    # the gate reports the line instead of crashing.
    report = validate_file(_write(tmp_path, "s.jsonl", [MESSAGES, {"messages": [{"role": ["x"], "content": "a"}]}]), "sft")
    assert [(f.line, f.expectation) for f in report.failures] == [(2, "record_format")]


def test_duplicates_are_counted_with_their_lines(tmp_path):
    a, b = _msgs(("user", "a"), ("assistant", "b")), _msgs(("user", "a"), ("assistant", "c"))
    path = _write(tmp_path, "d.jsonl", [a, b, a, "", b, a])
    report = validate_file(path, "sft")
    assert report.success and report.duplicates == 3 and report.duplicate_lines == [3, 5, 6]
    assert "3 duplicate(s) (lines 3, 5, 6)" in report.format()

    strict = validate_file(path, "sft", ValidationLimits(max_duplicate_fraction=0.5))
    assert [(f.line, f.expectation) for f in strict.failures] == [(0, "duplicate_fraction")]
    assert "3 of 5 records" in strict.failures[0].rule
    assert validate_file(path, "sft", ValidationLimits(max_duplicate_fraction=0.6)).success


def test_duplicates_in_text_and_ranking_files(tmp_path):
    txt = validate_file(_write(tmp_path, "d.txt", ["one", "", "two", "", "one"]), "pt")
    assert (txt.duplicates, txt.duplicate_lines) == (1, [5])
    ranked = validate_file(_write(tmp_path, "r.jsonl", [RANKING, dict(RANKING, responses=["best", "worst"]), RANKING]),
                           "preference")
    assert ranked.duplicate_lines == [3]


def test_limits_are_per_call_not_baked_into_the_suite(tmp_path):
    path = _write(tmp_path, "t.jsonl", [{"prompt": "x" * 30}])
    assert not validate_file(path, "prompts", ValidationLimits(max_chars=10)).success
    assert validate_file(path, "prompts").success


@pytest.mark.parametrize("name,lines", [("a.jsonl", [{"text": "short"}, {"text": "x" * 30_000}]),
                                        ("a.txt", ["one", "", "two", "", "x" * 40])])
def test_pt_documents_are_never_rejected_for_length(tmp_path, name, lines):
    """PT cuts documents into blocks, so a long web page or article is not an invalid record."""
    report = validate_file(_write(tmp_path, name, lines), "pt", ValidationLimits(max_chars=20))
    assert report.success and report.failures == [], report.format()


def test_long_chats_pass_by_default(tmp_path):
    """Length is the tokenize stage's `overlong` policy's business unless a limit is set."""
    long = _msgs(*[(r, "w " * 15_000) for r in ("user", "assistant")] * 40)  # 80 turns of 30,000 characters
    path = _write(tmp_path, "long.jsonl", [long, MESSAGES])
    assert validate_file(path, "sft").success
    assert not validate_file(path, "sft", ValidationLimits(max_turns=64)).success


def test_report_is_json_serialisable(tmp_path):
    path = _write(tmp_path, "m.jsonl", [TRL, "{", dict(TRL, chosen="c" * 50), TRL])
    report = validate_file(path, "preference", ValidationLimits(max_chars=40, min_rows=5))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == str(path) and data["kind"] == "preference" and data["success"] is False
    assert data["duplicates"] == 1 and data["duplicate_lines"] == [4]
    assert {"line": 2, "field": None, "expectation": "record_format"}.items() <= data["failures"][1].items()
    assert all({"name", "column", "success", "unexpected_count"} <= set(e) for e in data["expectations"])
    assert isinstance(report, ValidationReport)


def test_no_progress_bars_on_the_terminal(tmp_path, capfd):
    validate_file(_write(tmp_path, "q.jsonl", [{"prompt": "p"}]), "prompts")
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err


def test_unknown_kind_raises_value_error_naming_the_kinds(tmp_path):
    path = _write(tmp_path, "q.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="pt, sft, preference, prompts"):
        validate_file(path, "dpo")
    with pytest.raises(ValueError, match="'dpo'"):  # checked before any file is read
        validate_files([(tmp_path / "missing.jsonl", "sft"), (path, "dpo")])


def test_validate_files_keeps_order(tmp_path):
    good = _write(tmp_path, "g.jsonl", [GOOD_LINE["prompts"]])
    reports = validate_files([(good, "prompts"), (tmp_path / "x.txt", "pt")], ValidationLimits())
    assert [(r.path, r.success) for r in reports] == [(str(good), True), (str(tmp_path / "x.txt"), False)]


@pytest.mark.parametrize("kwargs,key", [
    ({"min_rows": -1}, "min_rows"),
    ({"min_rows": 5, "max_rows": 4}, "max_rows"),
    ({"max_rows": 0, "min_rows": 0}, "max_rows"),
    ({"max_chars": 0}, "max_chars"),
    ({"max_turns": 0}, "max_turns"),
    ({"max_turns": 2.5}, "max_turns"),
    ({"min_rows": True}, "min_rows"),
    ({"max_duplicate_fraction": 1.5}, "max_duplicate_fraction"),
    ({"max_duplicate_fraction": float("nan")}, "max_duplicate_fraction"),
])
def test_limits_out_of_range_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError) as info:
        ValidationLimits(**kwargs)
    assert info.value.key == key


def test_columns_cover_every_kind():
    from rlhf_core.data.formats import KINDS
    assert set(COLUMNS) == set(KINDS)


def test_ranking_is_flattened_best_versus_worst():
    from tasks.validation import _flatten_preference
    row, key = _flatten_preference(dict(RANKING, responses=["best", "a much longer middle one", "worst"]), "ranking")
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("Rank me.", "best", "worst")
    assert (row["n_turns"], row["max_chars"], row["longest_field"]) == (2, 24, "responses[1]")
    assert len(key) == 3  # all three pairs are part of the content compared for duplicates


def test_more_than_200_failing_rows_are_all_reported(tmp_path):
    # GX caps its `unexpected_list` at 200 values; every failing line must still be reported.
    lines = [{"prompt": f"doc {i} " + "x" * (20 if i % 2 else 0)} for i in range(600)]
    report = validate_file(_write(tmp_path, "many.jsonl", lines), "prompts", ValidationLimits(max_chars=15))
    assert [f.line for f in report.failures] == list(range(2, 601, 2))
    assert report.failures[-1].rule.startswith("has 28 characters")
