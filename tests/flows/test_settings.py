"""The environment the pipeline gives the processes it starts: quiet, offline-friendly defaults
and glibc's huge pages for large allocations; a value the user set wins."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows import settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fill_what_the_user_left_unset_and_keep_what_they_set(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    settings.apply_defaults()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    settings.apply_defaults()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def fake_python(tmp_path) -> Path:
    """A 'python' that passes stage.sh's dependency check and prints the GLIBC_TUNABLES it was started with."""
    exe = tmp_path / "python"
    exe.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\necho "tunables=${GLIBC_TUNABLES-<unset>}"\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("given, seen", [(None, settings.FAST_CHILDREN["GLIBC_TUNABLES"]),
                                         ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2"), ("", "")])
def test_stage_sh_starts_each_stage_with_the_same_default_unless_the_user_set_one(tmp_path, given, seen):
    """What dvc.yaml runs, also when DVC was started from a plain shell (no apply_defaults before it)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["RLHF_PYTHON"] = str(fake_python(tmp_path))
    if given is not None:
        env["GLIBC_TUNABLES"] = given
    out = subprocess.run(["sh", str(ROOT / "scripts" / "stage.sh"), "sft"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tunables={seen}"


def thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return re.search(r"\[(\w+)\]", text).group(1)


ALLOCATE = """
import torch
x = torch.zeros(49152, 576)  # SmolLM2's tied embedding gradient, 113 MB
x.add_(1)
kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')][0]
print(kb)
"""


def huge_kb(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", ALLOCATE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off or not Linux")
def test_the_default_puts_a_large_tensor_on_huge_pages():
    """With the default, a 113 MB tensor sits on 2 MB pages (one fault per 2 MB, not per 4 KB);
    where the kernel gives huge pages only on request (madvise), a process without it gets none."""
    assert huge_kb(settings.FAST_CHILDREN["GLIBC_TUNABLES"]) >= 64 * 1024
    if thp_mode() == "madvise":
        assert huge_kb(None) < 8 * 1024
