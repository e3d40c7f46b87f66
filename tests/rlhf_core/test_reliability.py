"""Nothing half-written, non-finite values stop a stage, post-conditions fail loudly."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_core import demo_data, formats, lm
from rlhf_core.atomic import atomic_dir, atomic_write_text
from rlhf_core.config import ModelConfig, SFTConfig, TokenizeConfig
from rlhf_core.encoding import tokenize_datasets
from rlhf_core.errors import TrainingError
from rlhf_core.modeling import build_tiny_causal_lm, check_tokenizer_fits, save_model
from rlhf_core.tokenizer import train_tokenizer

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)


def test_atomic_dir_keeps_the_old_output_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder is left behind"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"


def test_atomic_write_text_replaces_whole_files_only(tmp_path, monkeypatch):
    f = tmp_path / "metrics.json"
    atomic_write_text(f, "{}")

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(f, '{"loss": 1.0}')
    assert f.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    demo_data.generate(root / "raw", demo_data.DemoDataConfig(n_pt_docs=20, n_sft=48, n_preferences=8,
                                                             n_prompts=8, n_eval_prompts=2))
    convs = formats.read_conversations(root / "raw" / "sft.jsonl")
    tok = train_tokenizer([t.content for c in convs for t in c.turns], TINY.vocab_size)
    tokenize_datasets(tok, TokenizeConfig(max_length=64, block_size=32, max_prompt_length=32), root / "tok",
                      conversations=convs)
    save_model(build_tiny_causal_lm(TINY, tok), tok, root / "base")
    return root


def test_nan_loss_stops_the_stage_naming_step_and_keeps_the_last_checkpoint(tiny, monkeypatch):
    calls = {"n": 0}
    real = lm.lm_loss

    def poisoned(logits, labels, num_items=None):
        calls["n"] += 1
        loss, m = real(logits, labels, num_items)
        return (loss * float("nan") if calls["n"] == 3 else loss), m

    monkeypatch.setattr(lm, "lm_loss", poisoned)
    cfg = SFTConfig(max_steps=6, batch_size=8, save_every=2, eval_every=0, log_every=1, warmup_steps=1)
    with pytest.raises(TrainingError, match=r"sft: non-finite loss at step 3"):
        lm.run_sft(cfg, TINY, tiny / "tok", tiny / "base", tiny / "out", tiny / "ckpt")
    assert (tiny / "ckpt" / "trainer_state.json").exists(), "the step-2 checkpoint is kept"
    assert not (tiny / "out").exists(), "no final model is written, so nothing can be registered"


def test_a_save_that_misses_its_weights_never_replaces_the_good_model(tiny, monkeypatch):
    from rlhf_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny / "base")
    model = build_tiny_causal_lm(TINY, tok)
    before = (tiny / "base" / "model.safetensors").read_bytes()
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, path, **kw: (Path(path) / "config.json").write_text("{}"))
    with pytest.raises(TrainingError, match="incomplete.*safetensors"):
        save_model(model, tok, tiny / "base")
    assert (tiny / "base" / "model.safetensors").read_bytes() == before


def test_tokenizer_that_does_not_fit_the_model_is_refused(tiny):
    from rlhf_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny / "base")
    small = build_tiny_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 tok)
    small.resize_token_embeddings(len(tok) - 5)
    with pytest.raises(TrainingError, match="tokenizer has .* tokens but the model embeds only"):
        check_tokenizer_fits(small, tok, "models/sft")
