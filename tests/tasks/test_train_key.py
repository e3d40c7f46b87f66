"""The training key (the finished-result key and the loop's resume fingerprint) is one notion of
"same inputs": the stage's params and the content of every input, DVC's md5 where DVC has just
recorded it, every byte otherwise."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import yaml

from tasks import layout, stages
from tasks.params import Params

MIB = 1 << 20


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The sft stage's inputs: a tokenized folder holding a 3 MiB file, and the PT model."""
    monkeypatch.delenv("DVC_STAGE", raising=False)
    (tmp_path / layout.TOKENIZED / "sft" / "train").mkdir(parents=True)
    (tmp_path / layout.TOKENIZED / "sft" / "train" / "data.arrow").write_bytes(bytes(range(256)) * (3 * MIB // 256))
    (tmp_path / layout.model_dir("pt")).mkdir(parents=True)
    (tmp_path / layout.model_dir("pt") / "model.safetensors").write_bytes(b"weights" * 100)
    return tmp_path


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def first_mib_fingerprint(root) -> str:
    """The old loop fingerprint: each file's name, size and first MiB."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}".encode())
        h.update(f.read_bytes()[:MIB])
    return h.hexdigest()


def test_a_byte_deep_inside_an_input_changes_the_key(project):
    p = Params()
    arrow = project / layout.TOKENIZED / "sft" / "train" / "data.arrow"
    before, old_before = stages._train_key(project, p, "sft"), first_mib_fingerprint(project)
    _flip(arrow, 2 * MIB + 12345)  # past the first MiB; the size is unchanged
    assert first_mib_fingerprint(project) == old_before, "the old fingerprint could not see it"
    assert stages._train_key(project, p, "sft") != before
    _flip(arrow, 2 * MIB + 12345)
    assert stages._train_key(project, p, "sft") == before, "a function of content, not of time or path"


def test_the_key_changes_with_the_stage_params_and_not_with_another_stage(project):
    p = Params()
    key = stages._train_key(project, p, "sft")
    assert stages._train_key(project, replace(p, sft=replace(p.sft, learning_rate=0.5)), "sft") != key
    assert stages._train_key(project, replace(p, dpo=replace(p.dpo, beta=0.5)), "sft") == key


def _lock(root, md5: str, size: int, nfiles: int) -> None:
    entry = {"path": layout.TOKENIZED, "hash": "md5", "md5": md5, "size": size, "nfiles": nfiles}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"tokenize": {"outs": [entry]}}}))


def test_under_dvc_the_md5_dvc_recorded_stands_for_the_content(project, monkeypatch):
    """When DVC runs the stage it has just brought the deps up to date, so its dvc.lock md5 is
    used instead of reading every byte again, as long as the recorded size and file count match."""
    p = Params()
    _lock(project, "a" * 32 + ".dir", 3 * MIB, 1)
    plain = stages._train_key(project, p, "sft")  # not run by DVC: the content is hashed
    monkeypatch.setenv("DVC_STAGE", "sft")
    under_dvc = stages._train_key(project, p, "sft")
    assert under_dvc != plain
    _lock(project, "b" * 32 + ".dir", 3 * MIB, 1)
    assert stages._train_key(project, p, "sft") != under_dvc, "the key follows DVC's md5"
    _lock(project, "b" * 32 + ".dir", 3 * MIB + 1, 1)  # a lock entry that no longer describes the folder
    assert stages._train_key(project, p, "sft") == plain
    monkeypatch.setenv("DVC_STAGE", "dpo")  # DVC runs another stage: its lock says nothing about ours
    _lock(project, "b" * 32 + ".dir", 3 * MIB, 1)
    assert stages._train_key(project, p, "sft") == plain
