"""Readers for the input formats: PT text, SFT conversations, preference pairs and PPO prompts.

Every reader yields typed records. A record that breaks a rule raises `DataError` naming the file,
the 1-based line, the field and the rule, never a KeyError from further down.

Files are read by `rlhf_core.data.sources` (JSON lines, JSON arrays, `datasets` folders, Parquet,
`.txt` for PT).

Shapes (`SHAPES`, detected per record by `detect_shape`; one file holds one shape):
  pt          `text`, or plain `.txt` (one document per line, or blank-line separated paragraphs
              when the file has blank lines)
  sft         sharegpt: `{"conversations": [{"from": "system|human|gpt|function_call|observation",
              "value"}], "system"?, "tools"?}`; messages: `{"messages": [{"role", "content"}],
              "tools"?}` (content a string or a list of `{"type": "text", "text"}` parts);
              alpaca: `{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}`
  preference  question: `{"system"?, "history"?, "question", "response_chosen", "response_rejected"}`;
              trl: `{"prompt": str | messages, "chosen", "rejected"}` (a string or one assistant
              message each); ranking: `{"prompt", "responses": [best, ..., worst]}` expanded into
              all K(K-1)/2 pairs; sharegpt_pair / messages_pair: `{"conversations" | "messages",
              "chosen", "rejected", "tools"?}` with the replies as strings or turn objects;
              alpaca_pair: `{"instruction", "input"?, "chosen", "rejected"}`; implicit_prompt:
              only `chosen` and `rejected`, as message lists or "\\n\\nHuman: ... \\n\\nAssistant: ..."
              transcripts, whose shared leading turns are the prompt (as TRL's `extract_prompt`)
  prompts     `{"prompt": str}`, or any sft / preference record (its prompt side is used)

Empty optional fields (`"system": ""`, `"history": []`, `"input": ""`, `"tools": ""`) mean absent.
`columns` (params.yaml `data.columns.<kind>`) renames a file's own keys to these names first.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator

from rlhf_core.data.sources import iter_json_lines, open_source, text_documents
from rlhf_core.errors import DataError

KINDS = ("pt", "sft", "preference", "prompts")
ROLES = ("system", "user", "assistant", "function_call", "observation")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant",
                  "function_call": "function_call", "observation": "observation"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
                 "function_call": "function_call", "observation": "observation", "tool": "observation"}
TRAINED_ROLES = frozenset({"assistant", "function_call"})
"""The one place that says which turns are training targets: the assistant's replies and its
function calls. Tool results (`observation`) are context, masked like user turns."""
PROMPT_ROLES = frozenset({"user", "observation"})
NEXT_ROLES = {"user": ("assistant", "function_call"), "observation": ("assistant", "function_call"),
              "assistant": ("user",), "function_call": ("observation",)}
FIELDS = ("text", "conversations", "messages", "instruction", "input", "output", "system", "history", "tools",
          "prompt", "chosen", "rejected", "question", "response_chosen", "response_rejected", "responses")
"""Every key a shape reads: what `data.columns` may map a file's own keys onto."""
SHAPES = {
    "pt": ("text", "txt"),
    "sft": ("sharegpt", "messages", "alpaca"),
    "preference": ("question", "trl", "ranking", "sharegpt_pair", "messages_pair", "alpaca_pair", "implicit_prompt"),
}
SHAPES["prompts"] = ("prompt",) + SHAPES["sft"] + SHAPES["preference"]

# Control-token spellings of the common chat templates (ChatML, Llama 3, Phi, Zephyr, Mistral,
# Gemma). Tokenizers parse these inside text as real control tokens, so a row holding one could
# end a reply early or forge a turn; a real model's own added tokens are checked on top of these.
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|\[/?INST\]|<(?:start|end)_of_turn>")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    """A chat that ends with an assistant (or function-call) turn; every such turn is a target."""
    turns: tuple[Turn, ...]
    line: int = field(default=0, compare=False)  # source line, set by the reader
    tools: str | None = None  # JSON list of tool schemas, passed to the chat template as `tools=`


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user or observation turn) with a better and a worse reply.

    `group` is the source line; pairs expanded from one ranking share it, and `group_size` is the
    number of pairs that line produced (the RM loss averages over a prompt's pairs).
    """
    prompt: tuple[Turn, ...]
    chosen: str
    rejected: str
    group: int
    group_size: int = 1
    tools: str | None = None


@dataclass(frozen=True)
class Prompt:
    """Messages ending with a user (or observation) turn, to be answered by the policy."""
    messages: tuple[Turn, ...]
    line: int = field(default=0, compare=False)  # source line, set by the reader
    tools: str | None = None


class RecordError(ValueError):
    """A rule broken inside one record; the reader adds the file and line."""

    def __init__(self, field: str, rule: str):
        self.field, self.rule = field, rule
        super().__init__(f"{field}: {rule}")


# --- fields ----------------------------------------------------------------------------------

def _has(obj: dict, key: str) -> bool:
    return obj.get(key) is not None


def given(obj: dict, key: str) -> bool:
    """An optional field counts only when it holds something: "", [] and {} mean absent."""
    value = obj.get(key)
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, dict)):
        return bool(value)
    return value is not None


def check_text(value: str, field: str) -> str:
    """Reject text that is not valid Unicode or that holds a chat template's control tokens."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(field, f"holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}), "
                                 "which is not valid Unicode") from None
    found = SPECIAL_TOKEN.search(value)
    if found:
        raise RecordError(field, f"contains the control-token string {found.group()!r}, which a tokenizer would "
                                 "read as a real turn marker (data-side prompt injection)")
    return value


def _text(obj: dict, key: str, field: str | None = None) -> str:
    field = field or key
    if key not in obj or obj[key] is None:
        raise RecordError(field, "required field is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(field, "must not be empty or whitespace")
    return check_text(value, field)


def _object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise RecordError("<record>", f"must be a JSON object, got {type(obj).__name__}")
    return obj


def rename_columns(obj: Any, columns: dict[str, str] | None) -> Any:
    """A record with the file's own keys renamed to the shape's names (`columns`: ours -> theirs)."""
    if not columns or not isinstance(obj, dict):
        return obj
    theirs = set(columns.values())
    out = {k: v for k, v in obj.items() if k not in theirs and k not in columns}
    for ours, key in columns.items():
        if key in obj:
            out[ours] = obj[key]
    return out


def _tools(obj: dict) -> str | None:
    """The record's tool schemas as a JSON list string (a JSON string or a list in the file)."""
    if not given(obj, "tools"):
        return None
    value = obj["tools"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RecordError("tools", f"is a string but not JSON ({e})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError("tools", "must be a list of tool schemas (objects), or that list as a JSON string")
    if not value:
        return None
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    check_text(text, "tools")
    return text


# --- shapes ----------------------------------------------------------------------------------

def _one_of(obj: dict, groups: dict[str, bool]) -> str | None:
    present = [name for name, here in groups.items() if here]
    if len(present) > 1:
        raise RecordError(present[1], f"conflicting shapes: the record has both '{present[0]}' and "
                                      f"'{present[1]}' fields, so which one is meant is unknown")
    return present[0] if present else None


def _sft_shape(obj: dict) -> str | None:
    return _one_of(obj, {"conversations": _has(obj, "conversations"), "messages": _has(obj, "messages"),
                         "instruction": _has(obj, "instruction") or _has(obj, "output")})


def detect_shape(kind: str, obj: Any) -> str:
    """The shape (one of `SHAPES[kind]`) of one record, from its keys; conflicting keys raise."""
    obj = _object(obj)
    if kind == "pt":
        return "text"
    if kind == "sft":
        base = _sft_shape(obj)
        if base is None:
            raise RecordError("conversations", "required field is missing (or 'messages', or 'instruction' "
                                               "and 'output')")
        return {"conversations": "sharegpt", "messages": "messages", "instruction": "alpaca"}[base]
    pair = _has(obj, "chosen") or _has(obj, "rejected")
    if pair and _has(obj, "responses"):
        raise RecordError("responses", "conflicting shapes: the record has both 'responses' (a ranking) and "
                                       "'chosen'/'rejected' (a pair), so which one is meant is unknown")
    base = _one_of(obj, {
        "question": _has(obj, "question") or _has(obj, "response_chosen") or _has(obj, "response_rejected"),
        "prompt": _has(obj, "prompt"),
        "conversations": _has(obj, "conversations"),
        "messages": _has(obj, "messages"),
        "instruction": _has(obj, "instruction"),
    })
    if kind == "prompts" and not pair and not _has(obj, "responses"):
        if base in ("conversations", "messages"):
            return "sharegpt" if base == "conversations" else "messages"
        if base == "instruction":
            return "alpaca"
        if base is None:
            raise RecordError("prompt", "required field is missing (or 'messages', 'conversations', "
                                        "'instruction' or 'question')")
        return "question" if base == "question" else "prompt"
    if base == "question":
        return "question"
    if _has(obj, "responses"):
        return "ranking"
    if base in ("conversations", "messages", "instruction"):
        return {"conversations": "sharegpt_pair", "messages": "messages_pair", "instruction": "alpaca_pair"}[base]
    if base == "prompt":
        return "trl"
    if pair:
        return "implicit_prompt"
    raise RecordError("question", "required field is missing (or 'prompt', 'conversations', 'messages', "
                                  "'instruction', or 'chosen' and 'rejected' alone)")


# --- turns -----------------------------------------------------------------------------------

def _content(item: dict, key: str, field: str) -> str:
    """A message's text: a string, or OpenAI-style parts `[{"type": "text", "text": ...}]`."""
    value = item.get(key)
    if not isinstance(value, list):
        return _text(item, key, field)
    texts = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise RecordError(where, f"must be a content part object, got {type(part).__name__}")
        if part.get("type", "text") != "text":
            raise RecordError(f"{where}.type", f"only text parts can be trained on, got {part.get('type')!r}")
        texts.append(_text(part, "text" if "text" in part else "value", f"{where}.text"))
    if not texts:
        raise RecordError(field, "must not be empty")
    return "\n".join(texts)


def _parse_turns(obj: dict) -> tuple[Turn, ...]:
    if _has(obj, "conversations"):
        key, role_key, text_key, roles, label = "conversations", "from", "value", SHAREGPT_ROLES, SHAREGPT_ROLES
    elif _has(obj, "messages"):
        key, role_key, text_key, roles, label = "messages", "role", "content", MESSAGE_ROLES, MESSAGE_ROLES
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
        if not isinstance(role, str) or role not in roles:
            raise RecordError(f"{field}.{role_key}", f"unknown role {role!r} (allowed: {', '.join(label)})")
        turns.append(Turn(roles[role], _content(item, text_key, f"{field}.{text_key}")))
    if given(obj, "system"):
        if turns[0].role == "system":
            raise RecordError("system", f"is given twice: as the 'system' field and as {key}[0]")
        turns.insert(0, Turn("system", _text(obj, "system")))
    return tuple(turns)


def check_turn_order(turns: tuple[Turn, ...], field: str, last: str) -> None:
    """Optional system first, then a user turn; after a user or observation turn comes the
    assistant's reply or function call, after a function call its observation, after a reply the
    next user turn. `last` is "assistant" (a trainable chat) or "user" (a prompt)."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise RecordError(field, "has no user turn")
    offset = len(turns) - len(body)
    allowed: tuple[str, ...] = ("user",)
    for i, t in enumerate(body):
        if t.role not in allowed:
            want = " or ".join(f"'{r}'" for r in allowed)
            raise RecordError(field, f"turn {i + offset} is '{t.role}', expected {want} "
                                     "(system first, then user and assistant alternating)")
        allowed = NEXT_ROLES[t.role]
    ends = TRAINED_ROLES if last == "assistant" else PROMPT_ROLES
    if body[-1].role not in ends:
        raise RecordError(field, f"must end with the {last} turn, ends with '{body[-1].role}'")


def _history(obj: dict) -> list[Turn]:
    if not given(obj, "history"):
        return []
    history = obj["history"]
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [question, answer] pairs")
    msgs = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordError(f"history[{i}]", "must be a [question, answer] pair of non-empty strings")
        msgs += [Turn("user", check_text(pair[0], f"history[{i}][0]")),
                 Turn("assistant", check_text(pair[1], f"history[{i}][1]"))]
    return msgs


def _system(obj: dict) -> list[Turn]:
    return [Turn("system", _text(obj, "system"))] if given(obj, "system") else []


def _alpaca_prompt(obj: dict) -> tuple[Turn, ...]:
    """System, history, then instruction and input joined by a newline as the user turn."""
    question = _text(obj, "instruction")
    if given(obj, "input"):
        question = f"{question}\n{_text(obj, 'input')}"
    return tuple([*_system(obj), *_history(obj), Turn("user", question)])


def _chat_key(obj: dict) -> str:
    return "conversations" if _has(obj, "conversations") else "messages"


def parse_sft(obj: Any) -> Conversation:
    obj = _object(obj)
    shape = detect_shape("sft", obj)
    if shape == "alpaca":
        turns = (*_alpaca_prompt(obj), Turn("assistant", _text(obj, "output")))
        return Conversation(turns, tools=_tools(obj))
    turns = _parse_turns(obj)
    check_turn_order(turns, _chat_key(obj), "assistant")
    return Conversation(turns, tools=_tools(obj))


# --- preferences -----------------------------------------------------------------------------

def _prompt_messages(obj: dict, shape: str) -> tuple[Turn, ...]:
    """The prompt side of a preference record of `shape`."""
    if shape == "question":
        return tuple([*_system(obj), *_history(obj), Turn("user", _text(obj, "question"))])
    if shape in ("alpaca", "alpaca_pair"):
        return _alpaca_prompt(obj)
    if shape in ("sharegpt_pair", "messages_pair"):
        turns = _parse_turns(obj)
        check_turn_order(turns, _chat_key(obj), "user")
        return turns
    if "prompt" not in obj:
        raise RecordError("prompt", "required field is missing")
    if isinstance(obj["prompt"], list):
        turns = _parse_turns({"messages": obj["prompt"]})
        check_turn_order(turns, "prompt", "user")
        return turns
    return tuple([*_system(obj), Turn("user", _text(obj, "prompt"))])


def _response(obj: dict, key: str) -> str:
    """One reply: a string, a turn object ({"from": "gpt", "value"} or {"role": "assistant",
    "content"}), or a list holding exactly one assistant message (TRL's conversational form)."""
    value = obj.get(key)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or not _is_reply(value[0]):
            raise RecordError(key, "as a list must hold exactly one assistant message")
        value, key = value[0], f"{key}[0]"
    if isinstance(value, dict):
        if not _is_reply(value):
            raise RecordError(key, "as a turn object must be an assistant turn ({'from': 'gpt', 'value': ...} "
                                   "or {'role': 'assistant', 'content': ...})")
        text_key = "value" if "from" in value else "content"
        return _content(value, text_key, f"{key}.{text_key}")
    return _text(obj, key)


def _is_reply(turn: dict) -> bool:
    role = turn.get("from", turn.get("role"))
    return isinstance(role, str) and (SHAREGPT_ROLES.get(role) in TRAINED_ROLES or MESSAGE_ROLES.get(role) in TRAINED_ROLES)


def _transcript(value: Any, key: str) -> tuple[Turn, ...]:
    """A whole conversation: a message list, or an hh-rlhf "\\n\\nHuman: ...\\n\\nAssistant: ..." text."""
    if isinstance(value, list):
        return _parse_turns({"messages": value})
    if not isinstance(value, str) or not value.strip():
        raise RecordError(key, "must be a message list or a 'Human: ... Assistant: ...' transcript")
    parts = _HH_TURN.split(value)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(key, "without a prompt must be a message list or a '\\n\\nHuman: ... \\n\\nAssistant: "
                               "...' transcript")
    turns = []
    for i in range(1, len(parts), 2):
        role = "user" if parts[i] == "Human" else "assistant"
        turns.append(Turn(role, _text({"t": parts[i + 1].strip()}, "t", f"{key} turn {len(turns)}")))
    return tuple(turns)


def _implicit_prompt(obj: dict) -> tuple[tuple[Turn, ...], str, str]:
    """Split two whole conversations into their shared leading turns (the prompt) and the reply each
    adds, as TRL's `extract_prompt` does."""
    chosen, rejected = _transcript(obj.get("chosen"), "chosen"), _transcript(obj.get("rejected"), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt or prompt[-1].role not in PROMPT_ROLES:
        raise RecordError("chosen", "shares no prompt with 'rejected': the two must start with the same turns, "
                                    "up to a user turn, and differ only in the reply after it")
    check_turn_order(prompt, "chosen", "user")
    replies = []
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        rest = side[shared:]
        if len(rest) != 1 or rest[0].role not in TRAINED_ROLES:
            raise RecordError(key, f"after the prompt it shares with the other side must hold exactly one "
                                   f"assistant turn, holds {len(rest)} turn(s)")
        replies.append(rest[0].content)
    return prompt, replies[0], replies[1]


def parse_preference(obj: Any, group: int = 0) -> list[PreferencePair]:
    obj = _object(obj)
    shape = detect_shape("preference", obj)
    tools = _tools(obj)
    if shape == "implicit_prompt":
        prompt, chosen, rejected = _implicit_prompt(obj)
        if chosen.strip() == rejected.strip():
            raise RecordError("rejected", "must differ from chosen")
        return [PreferencePair(prompt, chosen, rejected, group, tools=tools)]
    prompt = _prompt_messages(obj, shape)
    if shape == "ranking":
        responses = obj["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise RecordError("responses", "must be a list of at least 2 responses, best first")
        texts = [_text({"r": r}, "r", f"responses[{i}]") for i, r in enumerate(responses)]
        if len({t.strip() for t in texts}) != len(texts):
            raise RecordError("responses", "responses must all differ")
        pairs = list(combinations(texts, 2))  # (better, worse): earlier in the list is better
        return [PreferencePair(prompt, c, r, group, len(pairs), tools) for c, r in pairs]
    keys = ("response_chosen", "response_rejected") if shape == "question" else ("chosen", "rejected")
    chosen, rejected = _response(obj, keys[0]), _response(obj, keys[1])
    if chosen.strip() == rejected.strip():
        raise RecordError(keys[1], f"must differ from {keys[0]}")
    return [PreferencePair(prompt, chosen, rejected, group, tools=tools)]


def parse_prompt(obj: Any) -> Prompt:
    obj = _object(obj)
    shape = detect_shape("prompts", obj)
    if shape in ("sharegpt", "messages"):
        turns = _parse_turns(obj)
        last = max((i for i, t in enumerate(turns) if t.role in PROMPT_ROLES), default=None)
        if last is None:
            raise RecordError(_chat_key(obj), "has no user turn")
        return Prompt(turns[: last + 1], tools=_tools(obj))
    if shape == "implicit_prompt":
        return Prompt(_implicit_prompt(obj)[0], tools=_tools(obj))
    return Prompt(_prompt_messages(obj, shape), tools=_tools(obj))


def parse_pt(obj: Any) -> str:
    return _text(_object(obj), "text")


# --- whole files -----------------------------------------------------------------------------

def _records(path, parse, columns=None, skip=frozenset()) -> Iterator:
    for lineno, obj in iter_json_lines(path):
        if lineno in skip:
            continue
        try:
            yield lineno, parse(rename_columns(obj, columns))
        except RecordError as e:
            raise DataError(path, lineno, e.field, e.rule) from None


def read_pt_documents(path: str | Path, columns: dict[str, str] | None = None,
                      skip: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """Documents from `.txt` (lines, or blank-line separated blocks) or records with `text`."""
    src = open_source(path)
    if src.layout != "txt":
        return [doc for _, doc in _records(src.path, parse_pt, columns, skip)]
    docs = []
    for line, doc in text_documents(src.path)[0]:
        if line in skip:
            continue
        try:
            docs.append(check_text(doc, "text"))
        except RecordError as e:
            raise DataError(src.path, line, e.field, e.rule) from None
    return docs


def read_conversations(path: str | Path, columns: dict[str, str] | None = None,
                       skip: frozenset[int] | set[int] = frozenset()) -> list[Conversation]:
    return [replace(c, line=n) for n, c in _records(path, parse_sft, columns, skip)]


def read_preferences(path: str | Path, columns: dict[str, str] | None = None,
                     skip: frozenset[int] | set[int] = frozenset()) -> list[PreferencePair]:
    out: list[PreferencePair] = []
    for lineno, obj in iter_json_lines(path):
        if lineno in skip:
            continue
        try:
            out += parse_preference(rename_columns(obj, columns), group=lineno)
        except RecordError as e:
            raise DataError(path, lineno, e.field, e.rule) from None
    return out


def read_prompts(path: str | Path, columns: dict[str, str] | None = None,
                 skip: frozenset[int] | set[int] = frozenset()) -> list[Prompt]:
    return [replace(p, line=n) for n, p in _records(path, parse_prompt, columns, skip)]
