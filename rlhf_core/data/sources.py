"""Input files as found on disk: what a data path is, and the raw records in it.

Layouts (`open_source`): JSON lines; a JSON array (a file whose first character is `[`, e.g.
LLaMA-Factory's `.json` files; a record's line is the line its element starts on); a folder
written by `datasets`' `save_to_disk`; a `.parquet` file (a record's "line" is its 1-based row);
`.txt` (any case) for PT text. A UTF-8 byte order mark is stripped (and counted). Duplicate JSON
keys are an error, never "last one wins". JSON lines and Parquet are streamed; a JSON array and a
text file are read once. What the records mean is `rlhf_core.data.formats`' business.
"""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf_core.errors import DataError

# --- files -----------------------------------------------------------------------------------

@dataclass
class Source:
    """One input as found on disk: its layout and whether a BOM was stripped."""
    path: Path
    layout: str  # "jsonl" | "json_array" | "arrow" | "parquet" | "txt"
    bom: bool = False


def is_text(path: Path) -> bool:
    return path.suffix.lower() == ".txt"


def open_source(path: str | Path) -> Source:
    """Name what `path` is, or raise DataError at line 0 saying why it cannot be read."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(path, 0, None, "is a symlink loop (following it leads back to itself)") from None
        if os.path.islink(path):
            raise DataError(path, 0, None, f"is a symlink to a missing file ({os.readlink(path)})") from None
        if e.errno == errno.ENOENT:
            raise DataError(path, 0, None, "file does not exist") from None
        raise DataError(path, 0, None, f"cannot be read ({e.strerror or e})") from None
    if os.path.isdir(path):
        if (path / "dataset_dict.json").exists():
            raise DataError(path, 0, None, "is a `datasets` folder with several splits; point the data path "
                                           "at one split's folder")
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return Source(path, "arrow")
        raise DataError(path, 0, None, "is a directory, not a data file (a folder is read only when "
                                       "`datasets`' save_to_disk wrote it)")
    if st.st_size == 0:
        raise DataError(path, 0, None, "file is empty")
    if is_text(path):
        return Source(path, "txt")
    if path.suffix.lower() == ".parquet":
        return Source(path, "parquet")
    with open(path, "rb") as f:
        head = f.read(4096)
    bom = head.startswith(b"\xef\xbb\xbf")
    first = head[3 if bom else 0:].lstrip()[:1]
    return Source(path, "json_array" if first == b"[" else "jsonl", bom)


def _decoder(duplicates: list[str]) -> json.JSONDecoder:
    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                duplicates.append(key)
            out[key] = value
        return out
    return json.JSONDecoder(object_pairs_hook=pairs)


class DuplicateKey(ValueError):
    """A JSON object names one key twice; `key` is the first such key."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"duplicate key '{key}' in one JSON object (which value is meant is unknown)")


def _decode(decoder: json.JSONDecoder, duplicates: list[str], text: str, start: int = 0) -> tuple[Any, int]:
    duplicates.clear()
    obj, end = decoder.raw_decode(text, start)
    if duplicates:
        raise DuplicateKey(duplicates[0])
    return obj, end


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at column {e.colno})"
    return f"malformed JSON ({type(e).__name__}: {e})"  # e.g. nesting too deep, integer too long


def decode_json_lines(lines) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """(line, object, None, None) for each non-blank line that decodes; (line, None, field, why)
    for each that does not. `lines` is any iterable of byte lines (a file, a list)."""
    duplicates: list[str] = []
    decoder = _decoder(duplicates)
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            yield lineno, None, None, f"not valid UTF-8 (byte {e.start})"
            continue
        try:
            obj, end = _decode(decoder, duplicates, text)
            if end != len(text):
                raise json.JSONDecodeError("Extra data", text, end)
            yield lineno, obj, None, None
        except DuplicateKey as e:
            yield lineno, None, e.key, str(e)
        except (ValueError, RecursionError) as e:
            yield lineno, None, None, _json_error(e)


def _json_array(path: Path) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """Each element of a JSON array with the line it starts on; one pass over the text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[: e.start].count(b"\n") + 1, None, f"not valid UTF-8 (byte {e.start})") from None
    duplicates: list[str] = []
    decoder = _decoder(duplicates)
    ws = re.compile(r"\s*")
    pos, line, counted = ws.match(text, 0).end() + 1, 1, 0  # past the opening "["

    def line_at(at: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return line

    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        start_line = line_at(pos)
        try:
            obj, pos = _decode(decoder, duplicates, text, pos)
            yield start_line, obj, None, None
        except DuplicateKey as e:
            yield start_line, None, e.key, str(e)
            try:  # skip the element: decode it again without the duplicate check
                pos = json.JSONDecoder().raw_decode(text, pos)[1]
            except ValueError:
                return
        except (ValueError, RecursionError) as e:
            # The rest of the array cannot be located once an element is broken.
            yield line_at(getattr(e, "pos", pos)), None, None, _json_error(e) + "; the rest of the array is not read"
            return
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            if text[pos + 1:].strip():
                yield line_at(pos + 1), None, None, "malformed JSON (extra data after the array)"
            return
        if not text.startswith(",", pos):
            yield line_at(pos), None, None, "malformed JSON (expected ',' or ']' between array elements)"
            return
        pos = ws.match(text, pos + 1).end()


def _arrow_rows(src: Source) -> Iterator[tuple[int, Any, str | None, str | None]]:
    try:
        if src.layout == "parquet":
            import pyarrow.parquet as pq

            batches = (b.to_pylist() for b in pq.ParquetFile(src.path).iter_batches(batch_size=1024))
        else:
            from datasets import load_from_disk

            ds = load_from_disk(str(src.path))
            batches = (ds[i:i + 1024] for i in range(0, len(ds), 1024))
            batches = ([dict(zip(b, row)) for row in zip(*b.values())] for b in batches)
        line = 0
        for batch in batches:
            for row in batch:
                line += 1
                yield line, row, None, None
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file: name it, not Arrow's traceback
        raise DataError(src.path, 0, None, f"cannot be read as {src.layout} ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''})") from None


def iter_objects(src: Source) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """(line, object, None, None) per record of a JSON-like source, or (line, None, field, why)
    for a record that cannot be decoded; callers stop at the first error or collect them all."""
    if src.layout in ("arrow", "parquet"):
        yield from _arrow_rows(src)
    elif src.layout == "json_array":
        yield from _json_array(src.path)
    else:
        with open(src.path, "rb") as f:
            yield from decode_json_lines(line.rstrip(b"\r\n") for line in f)


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each record of a JSON-like file; bad records raise."""
    src = open_source(path)
    found = False
    for lineno, obj, fld, error in iter_objects(src):
        if error:
            raise DataError(src.path, lineno, fld, error)
        found = True
        yield lineno, obj
    if not found:
        raise DataError(src.path, 0, None, "file is empty")


def text_documents(path: str | Path) -> tuple[list[tuple[int, str]], bool]:
    """(first line, document) for each document of a `.txt` file, and whether a BOM was stripped.
    Documents are lines, or blank-line separated paragraphs when the file has blank lines."""
    path = Path(path)
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[: e.start].count(b"\n") + 1, None, f"not valid UTF-8 (byte {e.start})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    filled = [i for i, ln in enumerate(lines) if ln.strip()]
    # paragraphs only when a blank line separates two documents (a trailing blank line does not)
    paragraphs = bool(filled) and filled[-1] - filled[0] + 1 > len(filled)
    docs: list[tuple[int, str]] = []
    block: list[str] = []
    for i, ln in enumerate(lines + [""]):
        if not paragraphs:
            if ln.strip():
                docs.append((i + 1, ln.strip()))
        elif ln.strip():
            if not block:
                start = i + 1
            block.append(ln)
        elif block:
            docs.append((start, "\n".join(block).strip()))
            block = []
    if not docs:
        raise DataError(path, 0, None, "file is empty")
    return docs, bom
