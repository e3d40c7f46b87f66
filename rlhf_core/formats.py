"""Readers for the input formats: PT text, SFT conversations, preference pairs and PPO prompts.

Every reader yields typed records. A record that breaks a rule raises `DataError` naming the file,
the 1-based line, the field and the rule, never a KeyError from further down.

Accepted shapes (JSONL, one object per line):
  pt          plain `.txt` (one document per line, or blank-line separated paragraphs when the
              file has blank lines) or `{"text": str}`
  sft         `{"conversations": [{"from": "system|human|gpt", "value": str}, ...]}` (ShareGPT)
              or `{"messages": [{"role": "system|user|assistant", "content": str}, ...]}`
  preference  `{"system"?, "history"?: [[q, a], ...], "question", "response_chosen",
              "response_rejected"}`, TRL's `{"prompt", "chosen", "rejected"}`, or a ranking
              `{"prompt", "responses": [best, ..., worst]}` expanded into all K(K-1)/2 pairs
  prompts     `{"prompt": str}`, or any sft / preference record (its prompt side is used)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator

from rlhf_core.errors import DataError

KINDS = ("pt", "sft", "preference", "prompts")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    """A chat that ends with an assistant turn; every assistant turn is a training target."""
    turns: tuple[Turn, ...]
    line: int = field(default=0, compare=False)  # source line, set by the reader


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user turn) with a better and a worse reply.

    `group` is the source line; pairs expanded from one ranking share it, and `group_size` is the
    number of pairs that line produced (the RM loss averages over a prompt's pairs).
    """
    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    group: int
    group_size: int = 1


@dataclass(frozen=True)
class Prompt:
    """Messages ending with a user turn, to be answered by the policy."""
    messages: tuple[Turn, ...]
    line: int = field(default=0, compare=False)  # source line, set by the reader


class RecordError(ValueError):
    """A rule broken inside one record; the reader adds the file and line."""

    def __init__(self, field: str, rule: str):
        self.field, self.rule = field, rule
        super().__init__(f"{field}: {rule}")


# --- raw lines -------------------------------------------------------------------------------

def decode_json_lines(raw: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, object, None) for each non-blank line that decodes, (line number, None, why)
    for each that does not; callers choose to stop at the first error or to collect them all."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, f"not valid UTF-8 (byte {e.start})"
            continue
        try:
            yield lineno, json.loads(text), None
        except json.JSONDecodeError as e:
            yield lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"
        except (ValueError, RecursionError) as e:  # e.g. nesting too deep, integer too long
            yield lineno, None, f"malformed JSON ({type(e).__name__}: {e})"


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line; bad bytes or JSON raise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, None, "file does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, 0, None, "file is empty")
    for lineno, obj, error in decode_json_lines(raw):
        if error:
            raise DataError(path, lineno, None, error)
        yield lineno, obj


def _text(obj: dict, key: str, field: str | None = None) -> str:
    field = field or key
    if key not in obj or obj[key] is None:
        raise RecordError(field, "required field is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(field, "must not be empty or whitespace")
    return value


def _object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise RecordError("<record>", f"must be a JSON object, got {type(obj).__name__}")
    return obj


# --- one record of each kind -----------------------------------------------------------------

def parse_pt(obj: Any) -> str:
    return _text(_object(obj), "text")


def _parse_turns(obj: dict) -> tuple[Turn, ...]:
    if "conversations" in obj:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    elif "messages" in obj:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    else:
        raise RecordError("conversations", "required field is missing (or 'messages')")
    items = obj[key]
    if not isinstance(items, list) or not items:
        raise RecordError(key, "must be a non-empty list of turns")
    turns = []
    for i, item in enumerate(items):
        field = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise RecordError(field, f"must be an object, got {type(item).__name__}")
        role = item.get(role_key)
        if role not in roles:
            raise RecordError(f"{field}.{role_key}", f"unknown role {role!r} (allowed: {', '.join(roles)})")
        turns.append(Turn(roles[role], _text(item, text_key, f"{field}.{text_key}")))
    return tuple(turns)


def check_turn_order(turns: tuple[Turn, ...], field: str, last: str) -> None:
    """Optional system first, then user/assistant alternating, ending with `last`."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise RecordError(field, "has no user turn")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise RecordError(field, f"turn {i + len(turns) - len(body)} is '{t.role}', expected '{want}' "
                                     "(system first, then user and assistant alternating)")
    if body[-1].role != last:
        raise RecordError(field, f"must end with the {last} turn, ends with '{body[-1].role}'")


def parse_sft(obj: Any) -> Conversation:
    turns = _parse_turns(_object(obj))
    check_turn_order(turns, "conversations" if "conversations" in obj else "messages", "assistant")
    return Conversation(turns)


def _prompt_messages(obj: dict) -> tuple[Turn, ...]:
    """The prompt side of a preference record in either schema."""
    if "question" in obj:
        msgs = []
        if obj.get("system") is not None:
            msgs.append(Turn("system", _text(obj, "system")))
        history = obj.get("history") or []
        if not isinstance(history, list):
            raise RecordError("history", "must be a list of [question, answer] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
                raise RecordError(f"history[{i}]", "must be a [question, answer] pair of non-empty strings")
            msgs += [Turn("user", pair[0]), Turn("assistant", pair[1])]
        msgs.append(Turn("user", _text(obj, "question")))
        return tuple(msgs)
    if "prompt" not in obj:
        raise RecordError("question", "required field is missing (or 'prompt')")
    if isinstance(obj["prompt"], list):
        turns = _parse_turns({"messages": obj["prompt"]})
        check_turn_order(turns, "prompt", "user")
        return turns
    return (Turn("user", _text(obj, "prompt")),)


def _response(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, list):  # TRL conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RecordError(key, "as a list must hold exactly one assistant message")
        return _text(value[0], "content", f"{key}[0].content")
    return _text(obj, key)


def parse_preference(obj: Any, group: int = 0) -> list[PreferencePair]:
    obj = _object(obj)
    prompt = _prompt_messages(obj)
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise RecordError("responses", "must be a list of at least 2 responses, best first")
        texts = [_text({"r": r}, "r", f"responses[{i}]") for i, r in enumerate(responses)]
        if len({t.strip() for t in texts}) != len(texts):
            raise RecordError("responses", "responses must all differ")
        pairs = list(combinations(texts, 2))  # (better, worse): earlier in the list is better
        return [PreferencePair(prompt, c, r, group, len(pairs)) for c, r in pairs]
    keys = ("response_chosen", "response_rejected") if "question" in obj else ("chosen", "rejected")
    chosen, rejected = _response(obj, keys[0]), _response(obj, keys[1])
    if chosen.strip() == rejected.strip():
        raise RecordError(keys[1], f"must differ from {keys[0]}")
    return [PreferencePair(prompt, chosen, rejected, group)]


def parse_prompt(obj: Any) -> Prompt:
    obj = _object(obj)
    if "conversations" in obj or "messages" in obj:
        turns = _parse_turns(obj)
        last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=None)
        if last_user is None:
            raise RecordError("conversations" if "conversations" in obj else "messages", "has no user turn")
        return Prompt(turns[: last_user + 1])
    return Prompt(_prompt_messages(obj))


# --- whole files -----------------------------------------------------------------------------

def _records(path, parse) -> Iterator:
    for lineno, obj in iter_json_lines(path):
        try:
            yield lineno, parse(obj)
        except RecordError as e:
            raise DataError(path, lineno, e.field, e.rule) from None


def read_pt_documents(path: str | Path) -> list[str]:
    """Documents from `.txt` (lines, or blank-line separated blocks) or JSONL `{"text"}`."""
    path = Path(path)
    if path.suffix != ".txt":
        return [doc for _, doc in _records(path, parse_pt)]
    if not path.is_file():
        raise DataError(path, 0, None, "file does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte {e.start})") from None
    text = text.replace("\r\n", "\n")  # CRLF files split into paragraphs like LF files
    lines = text.splitlines()
    paragraphs = re.split(r"\n\s*\n", text.strip())  # a blank line may hold spaces
    if any(not ln.strip() for ln in lines) and len(paragraphs) > 1:
        docs = [d.strip() for d in paragraphs]
    else:
        docs = [ln.strip() for ln in lines]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(path, 0, None, "file is empty")
    return docs


def read_conversations(path: str | Path) -> list[Conversation]:
    return [replace(c, line=n) for n, c in _records(path, parse_sft)]


def read_preferences(path: str | Path) -> list[PreferencePair]:
    out: list[PreferencePair] = []
    for lineno, obj in iter_json_lines(path):
        try:
            out += parse_preference(obj, group=lineno)
        except RecordError as e:
            raise DataError(path, lineno, e.field, e.rule) from None
    return out


def read_prompts(path: str | Path) -> list[Prompt]:
    return [replace(p, line=n) for n, p in _records(path, parse_prompt)]
