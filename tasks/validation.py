"""The data-quality gate: a real Great Expectations validation of every input file before training.

`validate_file(path, kind)` checks one file in three passes and returns a `ValidationReport`; it
never raises for bad data, it reports it:

1. Structural pass. Every line is read on its own, so one bad line does not hide the next: bad
   UTF-8, malformed JSON and records the `rlhf_core.formats` parser rejects each become a
   `Failure` with the 1-based line (expectation `record_format`). A missing or empty file is one
   `Failure` at line 0 (expectation `file_readable`).
2. Great Expectations pass. The records that parsed are flattened into a pandas DataFrame whose
   index is the source line number, and the kind's expectation suite (`rlhf_pt`, `rlhf_sft`,
   `rlhf_preference`, `rlhf_prompts`) runs on it. Each unexpected index maps back to a file line.
   The limits (`ValidationLimits`) reach the suite as GX suite parameters (`$PARAMETER`), so one
   suite per kind serves every configuration.
3. Duplicates. Records equal to an earlier record are counted and their lines listed; they fail
   the file only when their fraction exceeds `max_duplicate_fraction`.

The parser already rejects most broken records, so on real files the suite mostly catches what
the parser does not know about (limits: text length, number of turns, number of rows); the
suite still states every rule as a named expectation, and `report.expectations` lists them all.
"""
from __future__ import annotations

import os

# Must be set before great_expectations is imported (it is imported lazily, below).
os.environ["GX_ANALYTICS_ENABLED"] = "false"

import functools
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.formats import (
    KINDS,
    RecordError,
    Turn,
    decode_json_lines,
    parse_preference,
    parse_prompt,
    parse_pt,
    parse_sft,
    read_pt_documents,
)

__all__ = [
    "COLUMNS",
    "Failure",
    "ValidationLimits",
    "ValidationReport",
    "check_frame",
    "validate_file",
    "validate_files",
]

RECORD_FORMAT = "record_format"
FILE_READABLE = "file_readable"
DUPLICATE_FRACTION = "duplicate_fraction"

# The flattened columns each kind's DataFrame holds. `longest_field` is not validated: it names
# the field holding the record's longest text, so a too-long record points at the right field.
COLUMNS: dict[str, tuple[str, ...]] = {
    "pt": ("text",),
    "sft": ("first_user", "last_role", "n_turns", "roles", "all_text_chars", "longest_field"),
    "preference": ("prompt", "chosen", "rejected", "n_turns", "max_chars", "longest_field"),
    "prompts": ("prompt", "n_turns", "max_chars", "longest_field"),
}
_INT_COLUMNS = ("n_turns", "all_text_chars", "max_chars")


# --- limits and results ----------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationLimits:
    """Bounds the gate enforces on top of the record format."""

    min_rows: int = 1
    """Fewest valid records a file may hold."""
    max_rows: int = 1_000_000
    """Most valid records a file may hold."""
    max_chars: int = 20_000
    """Most characters in any one text field (a document, a turn, a prompt message, a response)."""
    max_turns: int = 64
    """Most turns in one conversation or prompt (a preference pair counts its prompt and one reply)."""
    max_duplicate_fraction: float = 1.0
    """Duplicates are always reported; they fail the file only above this fraction of its records."""

    def __post_init__(self) -> None:
        for key in ("min_rows", "max_rows", "max_chars", "max_turns"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(key, f"must be an integer, got {type(value).__name__}")
        if self.min_rows < 0:
            raise ConfigError("min_rows", f"must be >= 0, got {self.min_rows}")
        if self.max_rows < max(1, self.min_rows):
            raise ConfigError("max_rows", f"must be >= 1 and >= min_rows ({self.min_rows}), got {self.max_rows}")
        if self.max_chars < 1:
            raise ConfigError("max_chars", f"must be >= 1, got {self.max_chars}")
        if self.max_turns < 1:
            raise ConfigError("max_turns", f"must be >= 1, got {self.max_turns}")
        frac = self.max_duplicate_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)):
            raise ConfigError("max_duplicate_fraction", f"must be a number, got {type(frac).__name__}")
        if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
            raise ConfigError("max_duplicate_fraction", f"must be between 0 and 1, got {frac}")


@dataclass(frozen=True)
class Failure:
    """One broken rule, located in the input file."""

    line: int
    """1-based line of the input file; 0 means the file as a whole."""
    field: str | None
    """The field (or flattened column) at fault; None when it is the line or file as a whole."""
    expectation: str
    """GX expectation type (e.g. `expect_column_values_to_not_be_null`), or `record_format`,
    `file_readable` or `duplicate_fraction` for the checks made outside GX."""
    rule: str
    """The rule broken, in plain English."""

    def message(self, path: str | Path) -> str:
        """`path:line: field 'f': rule [expectation]`, shaped like `DataError`'s message."""
        return f"{DataError(path, self.line, self.field, self.rule)} [{self.expectation}]"


@dataclass
class ValidationReport:
    """What `validate_file` found in one file."""

    path: str
    kind: str
    rows: int
    """Records that parsed and went through the GX suite."""
    success: bool
    failures: list[Failure] = field(default_factory=list)
    duplicates: int = 0
    duplicate_lines: list[int] = field(default_factory=list)
    expectations: list[dict] = field(default_factory=list)
    """One entry per expectation run: name, column, success, unexpected_count, kwargs (the
    bounds as resolved from the limits) and, for table-level expectations, observed_value."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for MLflow artifacts and DVC metrics)."""
        return asdict(self)

    def format(self, limit: int = 20) -> str:
        """One line per failure (at most `limit`), then a summary line."""
        lines = [f.message(self.path) for f in self.failures[: max(limit, 0)]]
        if len(self.failures) > len(lines):
            lines.append(f"... and {len(self.failures) - len(lines)} more failure(s)")
        dup = ""
        if self.duplicates:
            shown = ", ".join(map(str, self.duplicate_lines[:10]))
            more = ", ..." if len(self.duplicate_lines) > 10 else ""
            dup = f" (line{'s' if self.duplicates > 1 else ''} {shown}{more})"
        met = sum(1 for e in self.expectations if e["success"])
        lines.append(
            f"{self.path}: {self.kind}: {'OK' if self.success else 'FAILED'}: {self.rows} valid record(s), "
            f"{len(self.failures)} failure(s), {self.duplicates} duplicate(s){dup}, "
            f"{met}/{len(self.expectations)} expectations met"
        )
        return "\n".join(lines)


# --- the expectation suites ------------------------------------------------------------------
# Each expectation carries `meta["rule"]`: the plain-English rule, formatted with the limits and
# with {value} / {length} of the offending value. `meta["field_from"]` names a column whose value
# on the failing row is the field reported (used for `longest_field`).

def _p(name: str) -> dict:
    return {"$PARAMETER": name}


def _not_null(column: str):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToNotBeNull(column=column, meta={"rule": "required value is missing"})


def _not_blank(column: str):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToMatchRegex(
        column=column, regex=r"\S", meta={"rule": "must not be empty or whitespace"})


def _required_text(*columns: str) -> list:
    return [e for c in columns for e in (_not_null(c), _not_blank(c))]


def _text_length_at_most_max_chars(column: str):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValueLengthsToBeBetween(
        column=column, min_value=1, max_value=_p("max_chars"),
        meta={"rule": "has {length} characters, more than max_chars={max_chars}"})


def _longest_text_at_most_max_chars(column: str):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToBeBetween(
        column=column, min_value=1, max_value=_p("max_chars"),
        meta={"rule": "has {value} characters, more than max_chars={max_chars}",
              "field_from": "longest_field"})


def _turns_at_most_max_turns(column: str = "n_turns"):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToBeBetween(
        column=column, min_value=1, max_value=_p("max_turns"),
        meta={"rule": "has {value} turns, more than max_turns={max_turns}"})


def _ends_with_assistant(column: str = "last_role"):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToBeInSet(
        column=column, value_set=["assistant"],
        meta={"rule": "conversation must end with the assistant turn, ends with {value}"})


def _roles_alternate(column: str = "roles"):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToMatchRegex(
        column=column, regex=r"^(?:system,)?user,assistant(?:,user,assistant)*$",
        meta={"rule": "roles must be an optional system turn, then user and assistant alternating; "
                      "got {value}"})


def _responses_differ(chosen: str = "chosen", rejected: str = "rejected"):
    import great_expectations.expectations as gxe
    return gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(
        column_list=[chosen, rejected], meta={"rule": f"{chosen} and {rejected} must differ"})


def _row_count_bounds() -> list:
    import great_expectations.expectations as gxe
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=_p("min_rows"), meta={"rule": "has {value} valid records, fewer than min_rows={min_rows}"}),
        gxe.ExpectTableRowCountToBeBetween(
            max_value=_p("max_rows"), meta={"rule": "has {value} valid records, more than max_rows={max_rows}"}),
    ]


def _pt_suite() -> list:
    return [*_required_text("text"), _text_length_at_most_max_chars("text"), *_row_count_bounds()]


def _sft_suite() -> list:
    return [
        *_required_text("first_user"),
        _not_null("last_role"),
        _ends_with_assistant(),
        _not_null("roles"),
        _roles_alternate(),
        _turns_at_most_max_turns(),
        _longest_text_at_most_max_chars("all_text_chars"),
        *_row_count_bounds(),
    ]


def _preference_suite() -> list:
    return [
        *_required_text("prompt", "chosen", "rejected"),
        _responses_differ(),
        _turns_at_most_max_turns(),
        _longest_text_at_most_max_chars("max_chars"),
        *_row_count_bounds(),
    ]


def _prompts_suite() -> list:
    return [
        *_required_text("prompt"),
        _turns_at_most_max_turns(),
        _longest_text_at_most_max_chars("max_chars"),
        *_row_count_bounds(),
    ]


_SUITES: dict[str, Callable[[], list]] = {
    "pt": _pt_suite, "sft": _sft_suite, "preference": _preference_suite, "prompts": _prompts_suite,
}
_RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 0,
                  "return_unexpected_index_query": False}
_LOCK = threading.RLock()  # a GX context is not thread-safe; Prefect may run tasks in threads


@dataclass(frozen=True)
class _Gx:
    context: Any
    validations: dict  # kind -> ValidationDefinition


@functools.cache
def _gx() -> _Gx:
    """One ephemeral GX context per process, with one datasource, asset, suite and validation
    definition per kind. Created on first use (importing GX takes seconds)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("rlhf_inputs")
    validations = {}
    for kind in KINDS:
        batch = source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe("whole_file")
        suite = context.suites.add(gx.ExpectationSuite(name=f"rlhf_{kind}", expectations=_SUITES[kind]()))
        validations[kind] = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"rlhf_{kind}", data=batch, suite=suite))
    return _Gx(context, validations)


def _plain(value: Any) -> Any:
    """numpy scalars and NaN -> plain JSON-friendly Python values."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _short(value: Any, width: int = 60) -> str:
    text = repr(_plain(value))
    return text if len(text) <= width else text[: width - 3] + "..."


def _rule(template: str, value: Any, limits: ValidationLimits) -> str:
    value = _plain(value)
    length = len(value) if isinstance(value, str) else value
    shown = value if isinstance(value, (int, float)) else _short(value)
    return template.format(value=shown, length=length, **asdict(limits))


def check_frame(kind: str, frame: pd.DataFrame, limits: ValidationLimits = ValidationLimits()
                ) -> tuple[list[Failure], list[dict]]:
    """Run the kind's GX suite on a flattened frame (columns `COLUMNS[kind]`, index = file lines).

    Returns the failures (unexpected indexes mapped to lines; table-level ones at line 0) and a
    summary of every expectation run.
    """
    _check_kind(kind)
    params = {k: getattr(limits, k) for k in ("min_rows", "max_rows", "max_chars", "max_turns")}
    with _LOCK:
        validation = _gx().validations[kind]
        result = validation.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                                result_format=_RESULT_FORMAT)
    failures: list[Failure] = []
    summary: list[dict] = []
    for er in result.results:
        config = er.expectation_config
        kwargs, meta, res = config.kwargs, config.meta or {}, er.result or {}
        column = kwargs.get("column") or (list(kwargs["column_list"]) if "column_list" in kwargs else None)
        field_name = ",".join(column) if isinstance(column, list) else column
        entry = {"name": config.type, "column": column, "success": bool(er.success),
                 "unexpected_count": _plain(res.get("unexpected_count")),
                 "kwargs": {k: _plain(v) for k, v in kwargs.items()
                            if k not in ("batch_id", "column", "column_list")}}
        if "observed_value" in res:
            entry["observed_value"] = _plain(res["observed_value"])
        summary.append(entry)
        info = er.exception_info or {}
        if info.get("raised_exception"):
            failures.append(Failure(0, field_name, config.type,
                                    f"expectation could not run: {info.get('exception_message')}"))
            continue
        if er.success:
            continue
        template = meta.get("rule", "expectation not met (value {value})")
        if "unexpected_index_list" not in res:  # table-level expectation
            failures.append(Failure(0, None, config.type, _rule(template, res.get("observed_value"), limits)))
            continue
        # Read the offending value from the frame: GX caps `unexpected_list` at 200 entries,
        # while `unexpected_index_list` is complete under the COMPLETE result format.
        for index in res["unexpected_index_list"]:
            line = int(index)
            value = frame.at[line, column] if isinstance(column, str) else None
            where = field_name
            if meta.get("field_from") in frame.columns:
                where = str(frame.at[line, meta["field_from"]])
            failures.append(Failure(line, where, config.type, _rule(template, value, limits)))
    return failures, summary


# --- reading and flattening ------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)}")


def _json_lines(raw: bytes) -> tuple[list[tuple[int, Any]], list[Failure]]:
    """(line, object) for each non-blank line that decodes; a Failure for each that does not."""
    objects, failures = [], []
    for lineno, obj, error in decode_json_lines(raw):
        if error:
            failures.append(Failure(lineno, None, RECORD_FORMAT, error))
        else:
            objects.append((lineno, obj))
    return objects, failures


def _longest(texts: list[tuple[str, str]]) -> tuple[int, str]:
    """(length, label) of the longest (label, text)."""
    return max(((len(t), label) for label, t in texts), key=lambda x: x[0])


def _chat_key(obj: dict) -> str:
    return "conversations" if "conversations" in obj else "messages"


def _prompt_labels(obj: dict, turns: tuple[Turn, ...], chat: bool) -> list[tuple[str, str]]:
    """(field label, text) for each prompt turn, named after where it came from in the record."""
    n = len(turns)
    if chat and ("conversations" in obj or "messages" in obj):
        labels = [f"{_chat_key(obj)}[{i}]" for i in range(n)]
    elif "question" in obj:
        labels = ["system"] if obj.get("system") is not None else []
        for i in range(len(obj.get("history") or [])):
            labels += [f"history[{i}][0]", f"history[{i}][1]"]
        labels.append("question")
    elif isinstance(obj.get("prompt"), list):
        labels = [f"prompt[{i}]" for i in range(n)]
    else:
        labels = ["prompt"]
    if len(labels) != n:  # never expected; keep the report usable anyway
        labels = [f"prompt turn {i}" for i in range(n)]
    return [(label, t.content) for label, t in zip(labels, turns)]


def _flatten_pt(obj: Any, lineno: int) -> tuple[dict, Any]:
    text = parse_pt(obj)
    return {"text": text}, text


def _flatten_sft(obj: Any, lineno: int) -> tuple[dict, Any]:
    conv = parse_sft(obj)
    turns = conv.turns
    key = _chat_key(obj)
    chars, label = _longest([(f"{key}[{i}]", t.content) for i, t in enumerate(turns)])
    row = {
        "first_user": next((t.content for t in turns if t.role == "user"), None),
        "last_role": turns[-1].role,
        "n_turns": len(turns),
        "roles": ",".join(t.role for t in turns),
        "all_text_chars": chars,
        "longest_field": label,
    }
    return row, conv


def _flatten_preference(obj: Any, lineno: int) -> tuple[dict, Any]:
    pairs = parse_preference(obj, group=lineno)
    first = pairs[0]
    # A ranking expands best-first into (0,1), (0,2), ..., so the pairs led by the best response
    # hold every other response once; the last pair's rejected is the worst response.
    responses = [first.chosen] + [p.rejected for p in pairs if p.chosen == first.chosen]
    if "responses" in obj:
        response_labels = [f"responses[{i}]" for i in range(len(responses))]
    elif "question" in obj:
        response_labels = ["response_chosen", "response_rejected"]
    else:
        response_labels = ["chosen", "rejected"]
    texts = _prompt_labels(obj, first.prompt, chat=False) + list(zip(response_labels, responses))
    chars, label = _longest(texts)
    row = {
        "prompt": first.prompt[-1].content,
        "chosen": first.chosen,
        "rejected": pairs[-1].rejected,
        "n_turns": len(first.prompt) + 1,
        "max_chars": chars,
        "longest_field": label,
    }
    return row, tuple((p.prompt, p.chosen, p.rejected) for p in pairs)


def _flatten_prompts(obj: Any, lineno: int) -> tuple[dict, Any]:
    prompt = parse_prompt(obj)
    msgs = prompt.messages
    chars, label = _longest(_prompt_labels(obj, msgs, chat=True))
    row = {"prompt": msgs[-1].content, "n_turns": len(msgs), "max_chars": chars, "longest_field": label}
    return row, prompt


_FLATTEN = {"pt": _flatten_pt, "sft": _flatten_sft, "preference": _flatten_preference,
            "prompts": _flatten_prompts}


def _structural_pass(path: Path, kind: str) -> tuple[list[tuple[int, dict, Any]], list[Failure], bool]:
    """(records as (line, row, content key), failures, readable)."""
    if not path.is_file():
        return [], [Failure(0, None, FILE_READABLE, "file does not exist")], False
    if kind == "pt" and path.suffix == ".txt":
        return _pt_text_pass(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [], [Failure(0, None, FILE_READABLE, f"cannot be read ({e.strerror or e})")], False
    if not raw.strip():
        return [], [Failure(0, None, FILE_READABLE, "file is empty")], False
    objects, failures = _json_lines(raw)
    records = []
    flatten = _FLATTEN[kind]
    for lineno, obj in objects:
        try:
            row, key = flatten(obj, lineno)
        except RecordError as e:
            failures.append(Failure(lineno, e.field, RECORD_FORMAT, e.rule))
            continue
        except Exception as e:  # the parser tripped on something it did not foresee
            failures.append(Failure(lineno, None, RECORD_FORMAT,
                                    f"record could not be parsed ({type(e).__name__}: {e})"))
            continue
        records.append((lineno, row, key))
    return records, failures, True


def _pt_text_pass(path: Path) -> tuple[list[tuple[int, dict, Any]], list[Failure], bool]:
    try:
        docs = read_pt_documents(path)
    except DataError as e:
        # The file is read as a whole, so nothing of it is usable: report and skip the GX pass.
        return [], [Failure(e.line, e.field, FILE_READABLE if e.line == 0 else RECORD_FORMAT, e.rule)], False
    except OSError as e:
        return [], [Failure(0, None, FILE_READABLE, f"cannot be read ({e.strerror or e})")], False
    # Documents are stripped pieces of the text, in order: find each to recover its first line.
    text = path.read_bytes().decode("utf-8")
    records, pos = [], 0
    for doc in docs:
        at = text.find(doc, pos)
        if at < 0:  # cannot happen for stripped substrings; keep going rather than raise
            at = pos
        records.append((text.count("\n", 0, at) + 1, {"text": doc}, doc))
        pos = at + len(doc)
    return records, [], True


def _frame(kind: str, records: list[tuple[int, dict, Any]]) -> pd.DataFrame:
    columns = COLUMNS[kind]
    frame = pd.DataFrame([row for _, row, _ in records], columns=list(columns),
                         index=[line for line, _, _ in records])
    for column in columns:
        if column in _INT_COLUMNS:
            frame[column] = frame[column].astype("int64")
    return frame


def _duplicates(records: Iterable[tuple[int, dict, Any]]) -> list[int]:
    seen: set = set()
    lines = []
    for line, _, key in records:
        if key in seen:
            lines.append(line)
        else:
            seen.add(key)
    return lines


# --- public entry points ---------------------------------------------------------------------

def validate_file(path: str | Path, kind: str, limits: ValidationLimits = ValidationLimits()) -> ValidationReport:
    """Validate one input file of `kind` ("pt", "sft", "preference" or "prompts").

    Raises ValueError only for an unknown kind; bad data is reported, never raised.
    """
    _check_kind(kind)
    path = Path(path)
    records, failures, readable = _structural_pass(path, kind)
    report = ValidationReport(path=str(path), kind=kind, rows=len(records), success=False)
    if readable:
        frame = _frame(kind, records)
        gx_failures, report.expectations = check_frame(kind, frame, limits)
        failures += gx_failures
        report.duplicate_lines = _duplicates(records)
        report.duplicates = len(report.duplicate_lines)
        if records and report.duplicates / len(records) > limits.max_duplicate_fraction:
            failures.append(Failure(
                0, None, DUPLICATE_FRACTION,
                f"{report.duplicates} of {len(records)} records repeat an earlier record "
                f"({report.duplicates / len(records):.1%}), more than max_duplicate_fraction="
                f"{limits.max_duplicate_fraction}"))
    report.failures = sorted(failures, key=lambda f: f.line)
    report.success = not report.failures
    return report


def validate_files(paths_and_kinds: list[tuple[str | Path, str]],
                   limits: ValidationLimits = ValidationLimits()) -> list[ValidationReport]:
    """Validate several files; every kind is checked before any file is read."""
    pairs = list(paths_and_kinds)
    for _, kind in pairs:
        _check_kind(kind)
    return [validate_file(path, kind, limits) for path, kind in pairs]
