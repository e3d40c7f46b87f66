"""Errors that name what was wrong and where, so a user never has to read a torch traceback."""
from __future__ import annotations

import re


class RLHFError(Exception):
    """Base class: every error the pipeline raises on purpose."""


class DataError(RLHFError):
    """A record in an input file breaks a rule.

    `line` is 1-based; 0 means the file as a whole (empty file, unreadable file).
    """

    def __init__(self, path, line: int, field: str | None, rule: str):
        self.path, self.line, self.field, self.rule = str(path), line, field, rule
        where = f"{self.path}:{line}" if line else self.path
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{rule}")


class ConfigError(RLHFError):
    """A configuration key is unknown, has the wrong type, or is out of range.

    An empty `key` means the file as a whole (`source` then names it, with a line if known). A rule
    without its own `[tag]` gets `[params]`, so every message ends with the rule it broke."""

    def __init__(self, key: str, rule: str, source: str | None = None):
        self.key, self.rule, self.source = key, rule, source
        where = f"{source}: " if source else ""
        what = f"'{key}': " if key else ""
        tag = "" if re.search(r"\[[a-z_]+\]$", rule) else " [params]"
        super().__init__(f"{where}{what}{rule}{tag}")


class TrainingError(RLHFError):
    """Training cannot go on (non-finite loss, broken post-condition)."""


class ModelLoadError(RLHFError):
    """A model or tokenizer path is missing, unsafe or unreadable."""
