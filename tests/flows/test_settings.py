"""The environment the pipeline gives the processes it starts: quiet, offline-friendly defaults,
and for the stage processes huge pages for glibc's large allocations; a value the user set wins."""
import os
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
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["GX_ANALYTICS_ENABLED"] == "false"
    assert "GLIBC_TUNABLES" not in os.environ  # not for the flow's own children (servers): stages only
    settings.apply_stage_env()
    assert os.environ["GLIBC_TUNABLES"] == settings.STAGE_ENV["GLIBC_TUNABLES"]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    settings.apply_stage_env()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def fake_python(tmp_path) -> Path:
    """A 'python' that passes stage.sh's dependency check and prints the GLIBC_TUNABLES it was started with."""
    exe = tmp_path / "python"
    exe.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\necho "tunables=${GLIBC_TUNABLES-<unset>}"\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("given, seen", [(None, settings.STAGE_ENV["GLIBC_TUNABLES"]),
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


REALLOCATE = """
import resource, torch
def touch():
    x = torch.zeros(49152, 576)  # SmolLM2's tied embedding gradient, 113 MB: 27,648 pages of 4 KB
    x.add_(1)
touch()  # the first one maps and faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_a_second_large_tensor(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", REALLOCATE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off or not Linux")
def test_under_the_stage_env_a_large_tensor_faults_once_per_huge_page():
    """A 113 MB tensor allocated after one was freed: glibc maps it afresh either way, and without
    the stage env (where the kernel gives huge pages only on request) every 4 KB page faults, as
    each vocabulary-sized gradient did at every training step; with it, about one fault per 2 MB."""
    if thp_mode() == "madvise":
        assert page_faults_of_a_second_large_tensor(None) > 20_000
    assert page_faults_of_a_second_large_tensor(settings.STAGE_ENV["GLIBC_TUNABLES"]) < 2_000
