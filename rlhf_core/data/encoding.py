"""Turn records into token ids: PT blocks, masked SFT chats, preference triples and prompts.

Rules (all counted in the manifest):
- PT: documents are joined with EOS and cut into `block_size` blocks; labels == input_ids. The
  final partial block is dropped (as HF's run_clm does), so every block is full length.
- SFT: the chat template is rendered; every non-assistant token is -100 in `labels`; every
  assistant turn and the template's own end-of-turn token (EOS) that closes it are trained once,
  even when pad == eos; what a template adds after EOS (ChatML's newline) is not trained. Each
  rendered prefix must be a token prefix of the next rendering, or tokenisation stops naming the
  file and line [chat_template_prefix]. A chat longer than
  `max_length` keeps its first `max_length` tokens (counted as truncated); a chat left with no
  trainable token is dropped (counted as dropped).
- Preferences: responses are cut to `max_response_length` tokens, then the prompt keeps its last
  tokens so that prompt + longer response fits `max_length`. A response is never cut to nothing.
- Prompts: rendered with the generation prompt; longer than `max_prompt_length` keeps the end.
- Over-long records (any of the cuts above) are kept cut with `overlong: truncate` (the default),
  skipped with `overlong: drop`, or stop tokenisation with `overlong: error`, naming file and line.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_core import IGNORE_INDEX
from rlhf_core.atomic import atomic_dir, atomic_write_text
from rlhf_core.config import TokenizeConfig
from rlhf_core.data.formats import TRAINED_ROLES, Conversation, PreferencePair, Prompt, Turn
from rlhf_core.errors import DataError

# Chat-template roles of the turns: a function call is the assistant speaking (trained, see
# formats.TRAINED_ROLES), a function's result is a `tool` message, as HF chat templates expect.
TEMPLATE_ROLES = {"function_call": "assistant", "observation": "tool"}


def _messages(turns) -> list[dict]:
    return [{"role": TEMPLATE_ROLES.get(t.role, t.role), "content": t.content} for t in turns]


class TemplateError(ValueError):
    """The chat template renders a conversation so that token-level masking would be wrong."""


def render_ids(tokenizer, turns, add_generation_prompt: bool = False, tools: str | None = None) -> list[int]:
    """Token ids of the template's rendering; `tools` (a JSON list) reaches the template as `tools=`."""
    extra = {"tools": json.loads(tools)} if tools else {}
    text = tokenizer.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _extends(prefix: list[int], full: list[int], what: str) -> None:
    """Masking relies on each rendering being a token prefix of the next; a template that rewrites
    earlier turns (e.g. drops past reasoning) or merges tokens across a turn boundary breaks it."""
    if full[:len(prefix)] != prefix:
        at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
        raise TemplateError(f"the chat template's rendering of {what} is not a token prefix of the rendering "
                            f"with the next turn (they differ at token {at}): the template rewrites earlier turns "
                            "or merges tokens across a turn boundary, so the trained tokens cannot be located "
                            "[chat_template_prefix]")


def split_reply(tokenizer, reply: list[int]) -> tuple[list[int], list[int]]:
    """(trained, untrained) parts of the tokens a template adds for one assistant turn.

    Trained: the reply up to and including the template's own end-of-turn token (the tokenizer's
    EOS, e.g. ChatML's `<|im_end|>`), once. Untrained: what the template adds after it (ChatML's
    newline), which the next turn's context carries. A template that does not close the turn with
    EOS gets one appended, since a model that never sees EOS never stops."""
    eos = tokenizer.eos_token_id
    if eos in reply:
        end = reply.index(eos) + 1
        return reply[:end], reply[end:]
    return reply + [eos], []


def response_ids(tokenizer, prompt: tuple[Turn, ...], response: str, prompt_ids: list[int] | None = None,
                 tools: str | None = None) -> list[int]:
    """Token ids of one assistant reply after `prompt`, through the end-of-turn token: exactly
    what a rollout that stops at EOS produces."""
    prompt_ids = render_ids(tokenizer, prompt, True, tools) if prompt_ids is None else prompt_ids
    full = render_ids(tokenizer, (*prompt, Turn("assistant", response)), tools=tools)
    _extends(prompt_ids, full, "the prompt with the generation prompt")
    return split_reply(tokenizer, full[len(prompt_ids):])[0]


def encode_sft(tokenizer, conv: Conversation, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one chat; labels are -100 outside trained turns
    (`formats.TRAINED_ROLES`: assistant replies and function calls).

    input_ids are the template's rendering of the whole chat (plus EOS after a turn the template
    leaves unclosed); labels keep each assistant reply through its end-of-turn token."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered: list[int] = []  # template tokens of the chat so far
    for i, turn in enumerate(conv.turns):
        if turn.role not in TRAINED_ROLES:
            continue
        prefix = render_ids(tokenizer, conv.turns[:i], add_generation_prompt=True, tools=conv.tools)
        full = render_ids(tokenizer, conv.turns[: i + 1], tools=conv.tools)
        _extends(rendered, prefix, f"turns 1-{i}")
        _extends(prefix, full, f"turns 1-{i} with the generation prompt")
        trained, tail = split_reply(tokenizer, full[len(prefix):])
        context = prefix[len(rendered):]  # system/user tokens (and the last reply's tail) since then
        input_ids += context + trained
        labels += [IGNORE_INDEX] * len(context) + trained
        if tail:  # e.g. ChatML's newline after <|im_end|>: part of the chat, not trained
            input_ids += tail
            labels += [IGNORE_INDEX] * len(tail)
        rendered = full
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def pack_blocks(tokenizer, docs: list[str], block_size: int) -> tuple[list[list[int]], int]:
    """Join documents with EOS and cut into full blocks; returns (blocks, dropped tail tokens)."""
    stream: list[int] = []
    for ids in (tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []):  # HF fails on []
        stream += ids + [tokenizer.eos_token_id]
    n = len(stream) // block_size
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n)], len(stream) - n * block_size


def encode_preference(tokenizer, pair: PreferencePair, cfg: TokenizeConfig) -> tuple[dict, bool]:
    prompt = render_ids(tokenizer, pair.prompt, add_generation_prompt=True, tools=pair.tools)
    chosen = response_ids(tokenizer, pair.prompt, pair.chosen, prompt, pair.tools)
    rejected = response_ids(tokenizer, pair.prompt, pair.rejected, prompt, pair.tools)
    truncated = False
    cap = min(cfg.max_response_length, cfg.max_length - 1)
    if max(len(chosen), len(rejected)) > cap:
        chosen, rejected, truncated = chosen[:cap], rejected[:cap], True
    room = cfg.max_length - max(len(chosen), len(rejected))
    if len(prompt) > room:
        prompt, truncated = prompt[-room:], True
    record = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
              "weight": 1.0 / pair.group_size}
    return record, truncated


def encode_prompt(tokenizer, prompt: Prompt, max_prompt_length: int) -> tuple[list[int], bool]:
    ids = render_ids(tokenizer, prompt.messages, add_generation_prompt=True, tools=prompt.tools)
    return ids[-max_prompt_length:], len(ids) > max_prompt_length


@dataclass
class SplitCounts:
    records_in: int = 0
    records_out: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class Manifest:
    """Counts per dataset and split, written beside the Arrow folders."""
    datasets: dict[str, dict[str, SplitCounts]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: {s: asdict(c) for s, c in v.items()} for k, v in self.datasets.items()}


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/eval split of n items; eval gets round(n * fraction), at least 1 if fraction > 0."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 and n > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _group_split(groups: list[int], cfg: TokenizeConfig) -> dict[str, list[int]]:
    """Split by source record, so pairs expanded from one ranking stay on one side. With
    `judge_fraction` > 0 a seeded share of records is first set aside as `judge` (the judge RM's
    data); the rest splits into train/eval exactly as it would without it."""
    uniq = sorted(set(groups))
    judge: set[int] = set()
    if cfg.judge_fraction > 0:
        rest, held = split_indices(len(uniq), cfg.judge_fraction, cfg.seed + 1)
        judge, uniq = {uniq[i] for i in held}, [uniq[i] for i in rest]
    tr, ev = split_indices(len(uniq), cfg.eval_fraction, cfg.seed)
    ev_groups = {uniq[i] for i in ev}
    idx = range(len(groups))
    out = {"train": [i for i in idx if groups[i] not in ev_groups and groups[i] not in judge],
           "eval": [i for i in idx if groups[i] in ev_groups]}
    if judge:
        out["judge"] = [i for i in idx if groups[i] in judge]
    return out


def _train_eval(n: int, cfg: TokenizeConfig) -> dict[str, list[int]]:
    train, eval_ = split_indices(n, cfg.eval_fraction, cfg.seed)
    return {"train": train, "eval": eval_}


def _save(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    from datasets import Dataset

    keys = list(rows[0].keys()) if rows else list(columns)
    with atomic_dir(path) as tmp:
        # An empty split (eval_fraction 0, every record dropped) still gets its columns and one
        # empty shard: without them `load_from_disk` cannot read the folder back (IndexError).
        Dataset.from_dict({k: [r[k] for r in rows] for k in keys}).save_to_disk(
            str(tmp), num_shards=None if rows else 1)


def write_split(name: str, items: list, encode, split: dict[str, list[int]], out_dir: Path, manifest: Manifest,
                columns: tuple[str, ...], overlong: str = "truncate", limit: str = "", source: str | Path = "") -> None:
    """Encode items per split with `encode(item) -> (row | None, truncated)`; save Arrow folders.
    A truncated record is kept, dropped or reported according to `overlong` (see TokenizeConfig)."""
    manifest.datasets[name] = {}
    too_long: list[int] = []
    for split_name, idx in split.items():
        counts, rows = SplitCounts(records_in=len(idx)), []
        for i in idx:
            try:
                row, truncated = encode(items[i])
            except TemplateError as e:
                raise DataError(source or f"<{name}>", _line(items[i]), None, str(e)) from None
            if row is not None and truncated and overlong != "truncate":
                too_long.append(_line(items[i]))
                row = None
            if row is None:
                counts.dropped += 1
                continue
            counts.truncated += int(truncated)
            counts.tokens += sum(len(v) for k, v in row.items() if k.endswith("ids"))
            rows.append(row)
        counts.records_out = len(rows)
        manifest.datasets[name][split_name] = counts
        _save(rows, out_dir / name / split_name, columns)
    if too_long and overlong == "error":
        lines = sorted(set(too_long))
        more = f" ({len(lines)} records in all, lines {', '.join(map(str, lines[:10]))}{', ...' if len(lines) > 10 else ''})"
        raise DataError(source or f"<{name}>", lines[0], None,
                        f"longer than {limit} tokens and tokenize.overlong is 'error'{more if len(lines) > 1 else ''} "
                        "[overlong]")


def _lines(lines: list[int]) -> str:
    lines = sorted(set(lines))
    return f"lines {', '.join(map(str, lines[:10]))}{', ...' if len(lines) > 10 else ''}"


def check_useful(manifest: Manifest, cfg: TokenizeConfig, cut: dict[tuple[str, str], list[int]],
                 sources: dict[str, str | Path]) -> None:
    """Post-condition: output a training stage can learn from. Fails (with counts) on an empty
    split, a kind that lost more than `max_dropped_fraction` of its records, a prompt cut below
    `min_prompt_tokens`, or a preference pair whose responses truncation made identical."""
    def fail(kind: str, line: int, rule: str):
        raise DataError(sources.get(kind) or f"<{kind}>", line, None, f"{rule} [useful_output]")

    for kind, splits in manifest.datasets.items():
        records_in = sum(c.records_in for c in splits.values())
        for split, c in splits.items():
            if (split == "train" and c.records_out == 0) or (c.records_in > 0 and c.records_out == 0):
                unit = "full blocks" if kind == "pt" else "records"
                fail(kind, 0, f"the {kind} {split} split is empty ({c.records_out} {unit} out of {c.records_in} "
                              f"records in; tokenize.eval_fraction={cfg.eval_fraction}, max_length={cfg.max_length}, "
                              f"block_size={cfg.block_size}, overlong={cfg.overlong})")
        dropped = sum(c.dropped for c in splits.values())
        if kind != "pt" and records_in and dropped / records_in > cfg.max_dropped_fraction:  # pt counts tail tokens
            fail(kind, 0, f"{dropped} of {records_in} {kind} records were dropped, more than "
                          f"tokenize.max_dropped_fraction={cfg.max_dropped_fraction} (too long for max_length="
                          f"{cfg.max_length} with overlong={cfg.overlong}, or no trainable token left)")
    for (kind, reason), lines in sorted(cut.items()):
        if lines:
            total = sum(c.records_in for c in manifest.datasets[kind].values())
            what = ("truncation left the prompt shorter than tokenize.min_prompt_tokens="
                    f"{min(cfg.min_prompt_tokens, cfg.max_prompt_length)}" if reason == "short_prompt" else
                    "truncation made chosen and rejected identical")
            fail(kind, sorted(lines)[0], f"{len(lines)} of {total} {kind} records: {what} ({_lines(lines)}); "
                                         "raise tokenize.max_length / max_response_length / max_prompt_length, "
                                         "or set tokenize.overlong: drop")


def _line(item) -> int:
    """The source line of a parsed record (a preference pair's group is its line)."""
    return getattr(item, "line", 0) or getattr(item, "group", 0)


def tokenize_datasets(tokenizer, cfg: TokenizeConfig, out_dir: Path, *, pt_docs: list[str] | None = None,
                      conversations: list[Conversation] | None = None,
                      preferences: list[PreferencePair] | None = None,
                      prompts: list[Prompt] | None = None, sources: dict[str, str | Path] | None = None) -> Manifest:
    """Tokenise whichever inputs are given into `out_dir/<kind>/<split>` plus `manifest.json`.
    `sources` names the file of each kind for error messages."""
    out_dir = Path(out_dir)
    sources = sources or {}
    manifest = Manifest()
    if pt_docs is not None:
        split = split_indices(len(pt_docs), cfg.eval_fraction, cfg.seed)
        manifest.datasets["pt"] = {}
        for split_name, idx in zip(("train", "eval"), split):
            blocks, tail = pack_blocks(tokenizer, [pt_docs[i] for i in idx], cfg.block_size)
            manifest.datasets["pt"][split_name] = SplitCounts(len(idx), len(blocks), len(blocks) * cfg.block_size, 0, tail)
            _save([{"input_ids": b} for b in blocks], out_dir / "pt" / split_name, ("input_ids",))
    if conversations is not None:
        def enc_sft(conv):
            ids, labels, truncated = encode_sft(tokenizer, conv, cfg.max_length)
            if all(l == IGNORE_INDEX for l in labels):
                return None, truncated
            return {"input_ids": ids, "labels": labels}, truncated
        write_split("sft", conversations, enc_sft, _train_eval(len(conversations), cfg), out_dir, manifest,
                    ("input_ids", "labels"), overlong=cfg.overlong, limit=f"tokenize.max_length={cfg.max_length}",
                    source=sources.get("sft", ""))
    # source lines of records that truncation made useless: (kind, "short_prompt" | "identical") -> lines
    cut: dict[tuple[str, str], list[int]] = {("preference", "short_prompt"): [], ("preference", "identical"): [],
                                             ("prompts", "short_prompt"): []}
    min_prompt = min(cfg.min_prompt_tokens, cfg.max_prompt_length)

    def enc_pref(pair):
        row, truncated = encode_preference(tokenizer, pair, cfg)
        if truncated and cfg.overlong == "truncate":
            if len(row["prompt_ids"]) < min_prompt:
                cut["preference", "short_prompt"].append(_line(pair))
            if row["chosen_ids"] == row["rejected_ids"]:
                cut["preference", "identical"].append(_line(pair))
        return row, truncated

    if preferences is not None:
        write_split("preference", preferences, enc_pref,
                    _group_split([p.group for p in preferences], cfg), out_dir, manifest,
                    ("prompt_ids", "chosen_ids", "rejected_ids", "weight"), overlong=cfg.overlong,
                    limit=f"tokenize.max_response_length={cfg.max_response_length} or max_length={cfg.max_length}",
                    source=sources.get("preference", ""))
    if prompts is not None:
        def enc_prompt(p):
            ids, truncated = encode_prompt(tokenizer, p, cfg.max_prompt_length)
            if truncated and cfg.overlong == "truncate" and len(ids) < min_prompt:
                cut["prompts", "short_prompt"].append(_line(p))
            return {"prompt_ids": ids}, truncated
        write_split("prompts", prompts, enc_prompt, _train_eval(len(prompts), cfg), out_dir, manifest,
                    ("prompt_ids",), overlong=cfg.overlong, limit=f"tokenize.max_prompt_length={cfg.max_prompt_length}",
                    source=sources.get("prompts", ""))
    check_useful(manifest, cfg, cut, sources)
    from rlhf_core.data.splits import check_tokenized

    check_tokenized(out_dir, len(tokenizer), cfg.block_size)  # post-condition: nothing malformed goes downstream
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return manifest
