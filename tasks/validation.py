"""The data-quality gate: a real Great Expectations validation of every input file before training.

`validate_file(path, kind)` checks one file in three passes and returns a `ValidationReport`; it
never raises for bad data, it reports it:

1. Structural pass. Every record is read on its own, so one bad record does not hide the next:
   bad UTF-8, malformed JSON, duplicate keys, records the `rlhf_core.data.formats` parser rejects and
   records whose shape differs from the file's first shape each become a `Failure` with the
   1-based line (expectation `record_format`). A missing, empty or unreadable file, a directory or
   a symlink loop is one `Failure` at line 0 (expectation `file_readable`).
2. Great Expectations pass. The records that parsed are flattened into a pandas DataFrame whose
   index is the source line number, and the kind's expectation suite (`rlhf_pt`, `rlhf_sft`,
   `rlhf_preference`, `rlhf_prompts`) runs on it. Each unexpected index maps back to a file line.
   The limits (`ValidationLimits`) reach the suite as GX suite parameters (`$PARAMETER`), so one
   suite per kind serves every configuration.
3. Duplicates. Records equal to an earlier record are counted and their lines listed; they fail
   the file only when their fraction exceeds `max_duplicate_fraction`.

The bad-row policy: the records with a failure are set aside (`report.invalid_lines`); the file
passes when they are at most `max_invalid_fraction` of its records and nothing failed at line 0
(the file as a whole). 0 restores all-or-nothing.

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

from rlhf_core.data.formats import (
    KINDS,
    RecordError,
    check_text,
    detect_shape,
    given,
    parse_preference,
    parse_prompt,
    parse_pt,
    parse_sft,
    rename_columns,
)
from rlhf_core.data.sources import iter_objects, open_source, text_documents
from rlhf_core.errors import ConfigError, DataError

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
    max_chars: int | None = None
    """Most characters in any one chat text field (a turn, a prompt message, a response); None: no
    limit, since the tokenize stage's `overlong` policy handles length. PT documents are never
    rejected for length (PT cuts them into blocks)."""
    max_turns: int | None = None
    """Most turns in one conversation or prompt (a preference pair counts its prompt and one reply);
    None: no limit."""
    max_duplicate_fraction: float = 1.0
    """Duplicates are always reported; they fail the file only above this fraction of its records."""
    max_invalid_fraction: float = 0.02
    """Invalid records up to this fraction of a file's records are set aside (written to
    `reports/rejected/`) and the run goes on with the rest; above it the file fails. 0: any
    invalid record fails the file."""

    def __post_init__(self) -> None:
        for key in ("min_rows", "max_rows", "max_chars", "max_turns"):
            value = getattr(self, key)
            if value is None and key in ("max_chars", "max_turns"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(key, f"must be an integer, got {type(value).__name__}")
        if self.min_rows < 0:
            raise ConfigError("min_rows", f"must be >= 0, got {self.min_rows}")
        if self.max_rows < max(1, self.min_rows):
            raise ConfigError("max_rows", f"must be >= 1 and >= min_rows ({self.min_rows}), got {self.max_rows}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError("max_chars", f"must be >= 1, got {self.max_chars}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ConfigError("max_turns", f"must be >= 1, got {self.max_turns}")
        for key in ("max_duplicate_fraction", "max_invalid_fraction"):
            frac = getattr(self, key)
            if isinstance(frac, bool) or not isinstance(frac, (int, float)):
                raise ConfigError(key, f"must be a number, got {type(frac).__name__}")
            if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
                raise ConfigError(key, f"must be between 0 and 1, got {frac}")


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
    records: int = 0
    """Records read (valid or not): the denominator of the invalid fraction."""
    invalid_lines: list[int] = field(default_factory=list)
    """Lines of the records set aside (every line with a failure)."""
    max_invalid_fraction: float = 0.0
    shape: str | None = None
    """The file's shape (`rlhf_core.data.formats.SHAPES`), from its first record that has one."""
    bom_stripped: bool = False
    duplicates: int = 0
    duplicate_lines: list[int] = field(default_factory=list)
    expectations: list[dict] = field(default_factory=list)
    """One entry per expectation run: name, column, success, unexpected_count, kwargs (the
    bounds as resolved from the limits) and, for table-level expectations, observed_value."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for MLflow artifacts and DVC metrics)."""
        return asdict(self)

    @property
    def invalid(self) -> int:
        return len(self.invalid_lines)

    @property
    def valid(self) -> int:
        return self.records - self.invalid

    def policy(self) -> str:
        """What the bad-row policy made of the file: shape, records, how many were set aside."""
        text = f"{self.shape or 'no shape'}, {self.records} record(s)"
        if self.bom_stripped:
            text += ", UTF-8 BOM stripped"
        if self.records:
            share = self.invalid / self.records
            over = share > self.max_invalid_fraction
            text += (f", {self.invalid} invalid ({share:.1%}, {'over' if over else 'within'} "
                     f"max_invalid_fraction={self.max_invalid_fraction})")
            if self.invalid and not over:
                text += f", {self.invalid} set aside"
        return text

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
            f"{met}/{len(self.expectations)} expectations met; {self.policy()}"
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
        column=column, value_set=["assistant", "function_call"],
        meta={"rule": "conversation must end with the assistant turn, ends with {value}"})


def _roles_alternate(column: str = "roles"):
    import great_expectations.expectations as gxe
    return gxe.ExpectColumnValuesToMatchRegex(
        column=column,
        regex=r"^(?:system,)?user,(?:assistant|function_call)(?:,(?:user|observation),(?:assistant|function_call))*$",
        meta={"rule": "roles must be an optional system turn, then user (or observation) and assistant (or "
                      "function_call) alternating; got {value}"})


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


def _pt_suite() -> list:  # no length rule: PT cuts documents into blocks
    return [*_required_text("text"), *_row_count_bounds()]


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


def _longest(texts: list[tuple[str, str]]) -> tuple[int, str]:
    """(length, label) of the longest (label, text)."""
    return max(((len(t), label) for label, t in texts), key=lambda x: x[0])


def _chat_key(obj: dict) -> str:
    return "conversations" if obj.get("conversations") is not None else "messages"


def _turn_labels(obj: dict, shape: str, n: int) -> list[str]:
    """A field label for each of the first `n` turns a record of `shape` yields, named after where
    the text came from in the record (so a failure points at the right field)."""
    system = ["system"] if given(obj, "system") else []
    if shape in ("sharegpt", "messages", "sharegpt_pair", "messages_pair"):
        key = _chat_key(obj)
        labels = system + [f"{key}[{i}]" for i in range(len(obj.get(key) or []))]
    elif shape in ("question", "alpaca", "alpaca_pair"):
        labels = list(system)
        for i in range(len(obj.get("history") or [])):
            labels += [f"history[{i}][0]", f"history[{i}][1]"]
        labels += ["question"] if shape == "question" else ["instruction", "output"]
    elif shape == "implicit_prompt":
        labels = [f"chosen turn {i}" for i in range(n)]
    elif isinstance(obj.get("prompt"), list):
        labels = [f"prompt[{i}]" for i in range(len(obj["prompt"]))]
    else:
        labels = system + ["prompt"]
    labels = labels[:n]
    if len(labels) != n:  # never expected; keep the report usable anyway
        labels = [f"turn {i}" for i in range(n)]
    return labels


def _flatten_pt(obj: Any, shape: str) -> tuple[dict, Any]:
    text = parse_pt(obj)
    return {"text": text}, text


def _flatten_sft(obj: Any, shape: str) -> tuple[dict, Any]:
    conv = parse_sft(obj)
    turns = conv.turns
    labels = _turn_labels(obj, shape, len(turns))
    chars, label = _longest([(lab, t.content) for lab, t in zip(labels, turns)])
    row = {
        "first_user": next((t.content for t in turns if t.role == "user"), None),
        "last_role": turns[-1].role,
        "n_turns": len(turns),
        "roles": ",".join(t.role for t in turns),
        "all_text_chars": chars,
        "longest_field": label,
    }
    return row, conv


def _flatten_preference(obj: Any, shape: str) -> tuple[dict, Any]:
    pairs = parse_preference(obj, group=0)
    first = pairs[0]
    # A ranking expands best-first into (0,1), (0,2), ..., so the pairs led by the best response
    # hold every other response once; the last pair's rejected is the worst response.
    responses = [first.chosen] + [p.rejected for p in pairs if p.chosen == first.chosen]
    if shape == "ranking":
        response_labels = [f"responses[{i}]" for i in range(len(responses))]
    elif shape == "question":
        response_labels = ["response_chosen", "response_rejected"]
    else:
        response_labels = ["chosen", "rejected"]
    texts = list(zip(_turn_labels(obj, shape, len(first.prompt)), (t.content for t in first.prompt)))
    chars, label = _longest(texts + list(zip(response_labels, responses)))
    row = {
        "prompt": first.prompt[-1].content,
        "chosen": first.chosen,
        "rejected": pairs[-1].rejected,
        "n_turns": len(first.prompt) + 1,
        "max_chars": chars,
        "longest_field": label,
    }
    return row, tuple((p.prompt, p.chosen, p.rejected, p.tools) for p in pairs)


def _flatten_prompts(obj: Any, shape: str) -> tuple[dict, Any]:
    prompt = parse_prompt(obj)
    msgs = prompt.messages
    labels = _turn_labels(obj, shape, len(msgs))
    chars, label = _longest([(lab, t.content) for lab, t in zip(labels, msgs)])
    row = {"prompt": msgs[-1].content, "n_turns": len(msgs), "max_chars": chars, "longest_field": label}
    return row, prompt


_FLATTEN = {"pt": _flatten_pt, "sft": _flatten_sft, "preference": _flatten_preference,
            "prompts": _flatten_prompts}


@dataclass
class _Read:
    """What the structural pass found in one file."""
    records: list[tuple[int, dict, Any]] = field(default_factory=list)  # (line, row, content key)
    failures: list[Failure] = field(default_factory=list)
    readable: bool = True
    count: int = 0  # records read, valid or not
    shape: str | None = None
    bom: bool = False


def _token_pattern(tokens: Iterable[str]):
    import re

    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def find_token(value: Any, pattern, where: str = "") -> tuple[str, str] | None:
    """(field, token) of the first string in a raw record holding one of the tokenizer's own
    special or added tokens, or None."""
    if isinstance(value, str):
        found = pattern.search(value)
        return (where or "<record>", found.group()) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        hit = find_token(item, pattern, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if hit:
            return hit
    return None


def _structural_pass(path: Path, kind: str, columns: dict[str, str] | None = None,
                     special_tokens: Iterable[str] = ()) -> _Read:
    read = _Read()
    try:
        src = open_source(path)
    except DataError as e:
        return _Read(failures=[Failure(0, None, FILE_READABLE, e.rule)], readable=False)
    read.bom = src.bom
    if src.layout == "txt":
        if kind != "pt":
            return _Read(failures=[Failure(0, None, FILE_READABLE, f"a .txt file holds PT text; {kind} data must be "
                                            "JSON lines, a JSON array, a datasets folder or Parquet")], readable=False)
        return _pt_text_pass(src.path)
    pattern = _token_pattern(special_tokens)
    flatten = _FLATTEN[kind]
    first: tuple[str, int] | None = None
    try:
        for lineno, obj, fld, error in iter_objects(src):
            read.count += 1
            if error:
                read.failures.append(Failure(lineno, fld, RECORD_FORMAT, error))
                continue
            obj = rename_columns(obj, columns)
            try:
                shape = detect_shape(kind, obj)
                if first is None:
                    first = (shape, lineno)
                elif shape != first[0]:
                    raise RecordError("<record>", f"has the shape '{shape}', but the file's records have the shape "
                                                  f"'{first[0]}' (line {first[1]}); a file holds one shape")
                hit = find_token(obj, pattern) if pattern else None
                if hit:
                    raise RecordError(hit[0], f"contains {hit[1]!r}, a special token of the model's tokenizer, which "
                                              "it would read as a control token (data-side prompt injection)")
                row, key = flatten(obj, shape)
            except RecordError as e:
                read.failures.append(Failure(lineno, e.field, RECORD_FORMAT, e.rule))
                continue
            except Exception as e:  # the parser tripped on something it did not foresee
                read.failures.append(Failure(lineno, None, RECORD_FORMAT,
                                             f"record could not be parsed ({type(e).__name__}: {e})"))
                continue
            read.records.append((lineno, row, key))
    except DataError as e:  # the file cannot be read on from here
        read.failures.append(Failure(e.line, e.field, FILE_READABLE if e.line == 0 else RECORD_FORMAT, e.rule))
        read.readable = e.line != 0
    if read.count == 0 and read.readable:
        return _Read(failures=[Failure(0, None, FILE_READABLE, "file is empty")], readable=False, bom=src.bom)
    read.shape = first[0] if first else None
    return read


def _pt_text_pass(path: Path) -> _Read:
    try:
        docs, bom = text_documents(path)
    except DataError as e:
        # The file is read as a whole, so nothing of it is usable: report and skip the GX pass.
        return _Read(failures=[Failure(e.line, e.field, FILE_READABLE if e.line == 0 else RECORD_FORMAT, e.rule)],
                     readable=False)
    except OSError as e:
        return _Read(failures=[Failure(0, None, FILE_READABLE, f"cannot be read ({e.strerror or e})")], readable=False)
    read = _Read(count=len(docs), shape="txt", bom=bom)
    for line, doc in docs:
        try:
            read.records.append((line, {"text": check_text(doc, "text")}, doc))
        except RecordError as e:
            read.failures.append(Failure(line, e.field, RECORD_FORMAT, e.rule))
    return read


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

def validate_file(path: str | Path, kind: str, limits: ValidationLimits = ValidationLimits(),
                  columns: dict[str, str] | None = None, special_tokens: Iterable[str] = ()) -> ValidationReport:
    """Validate one input file of `kind` ("pt", "sft", "preference" or "prompts").

    `columns` renames the file's own keys (params.yaml `data.columns.<kind>`); `special_tokens`
    are the model tokenizer's own control tokens, refused in any text on top of the usual ones.
    Raises ValueError only for an unknown kind; bad data is reported, never raised.
    """
    _check_kind(kind)
    path = Path(path)
    read = _structural_pass(path, kind, columns, special_tokens)
    failures = read.failures
    report = ValidationReport(path=str(path), kind=kind, rows=len(read.records), success=False, records=read.count,
                              max_invalid_fraction=limits.max_invalid_fraction, shape=read.shape, bom_stripped=read.bom)
    if read.readable:
        frame = _frame(kind, read.records)
        gx_failures, report.expectations = check_frame(kind, frame, limits)
        failures += gx_failures
        report.duplicate_lines = _duplicates(read.records)
        report.duplicates = len(report.duplicate_lines)
        if read.records and report.duplicates / len(read.records) > limits.max_duplicate_fraction:
            failures.append(Failure(
                0, None, DUPLICATE_FRACTION,
                f"{report.duplicates} of {len(read.records)} records repeat an earlier record "
                f"({report.duplicates / len(read.records):.1%}), more than max_duplicate_fraction="
                f"{limits.max_duplicate_fraction}"))
    report.failures = sorted(failures, key=lambda f: f.line)
    report.invalid_lines = sorted({f.line for f in failures if f.line > 0})
    whole_file = not read.readable or any(f.line == 0 for f in failures)
    share = report.invalid / report.records if report.records else 0.0
    report.success = not whole_file and share <= limits.max_invalid_fraction
    return report


def validate_files(paths_and_kinds: list[tuple[str | Path, str]],
                   limits: ValidationLimits = ValidationLimits(), columns: dict[str, dict] | None = None,
                   special_tokens: Iterable[str] = ()) -> list[ValidationReport]:
    """Validate several files; every kind is checked before any file is read. `columns` maps a
    kind to its column renaming."""
    pairs = list(paths_and_kinds)
    for _, kind in pairs:
        _check_kind(kind)
    columns = columns or {}
    return [validate_file(path, kind, limits, columns.get(kind), special_tokens) for path, kind in pairs]


def rejected_records(report: ValidationReport) -> list[dict]:
    """One JSON-able entry per failure of a set-aside record: line, field, rule, expectation."""
    return [{"line": f.line, "field": f.field, "rule": f.rule, "expectation": f.expectation}
            for f in report.failures if f.line > 0]


def model_special_tokens(name_or_path: str) -> list[str]:
    """The special and added tokens of a local model folder's tokenizer (read from its JSON files,
    without loading it), or [] for the built-in tiny model or a hub id."""
    import json

    folder = Path(name_or_path) if name_or_path else None
    if folder is None or not folder.is_dir():
        return []
    tokens: set[str] = set()

    def content(t) -> str | None:
        return t if isinstance(t, str) else t.get("content") if isinstance(t, dict) else None

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for t in data.get("added_tokens", []):
            tokens.add(content(t))
        for t in (data.get("added_tokens_decoder") or {}).values():
            tokens.add(content(t))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            tokens.add(content(data.get(key)))
        for t in data.get("additional_special_tokens") or []:
            tokens.add(content(t))
    return sorted(t for t in tokens if t and t.strip())


def tokenized_checks(out_dir: Path, sources: dict[str, str]) -> dict[str, dict]:
    """Per input file, what its tokenised train split holds: rows, labels aligned (checked by
    `check_tokenized` before this runs), the share of trainable tokens, rows left with nothing to
    train (dropped by tokenize) and preference pairs whose two sides are identical token for token."""
    import json

    from datasets import load_from_disk

    from rlhf_core import IGNORE_INDEX

    manifest = json.loads((Path(out_dir) / "manifest.json").read_text()) if (Path(out_dir) / "manifest.json").exists() else {}
    checks: dict[str, dict] = {}
    for kind, source in sources.items():
        path = Path(out_dir) / kind / "train"
        if not (path / "dataset_info.json").exists():
            continue
        ds = load_from_disk(str(path))
        splits = manifest.get(kind, {})
        entry = {"source": str(source), "rows": len(ds),
                 "records_dropped": sum(int(s.get("dropped", 0)) for s in splits.values()) if kind != "pt" else 0}
        if kind == "sft":
            total = trained = nothing = 0
            for labels in ds["labels"]:
                n = sum(1 for x in labels if x != IGNORE_INDEX)
                total, trained, nothing = total + len(labels), trained + n, nothing + (n == 0)
            entry.update(labels_aligned=True, trainable_share=round(trained / total, 4) if total else 0.0,
                         rows_nothing_to_train=nothing)
        if kind == "preference":
            entry["identical_pairs"] = sum(1 for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]) if c == r)
        checks[kind] = entry
    return checks
