"""Nothing half-written, non-finite values stop a stage, post-conditions fail loudly."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import build_tiny_sft_project, context

from rlhf_core.atomic import atomic_dir, atomic_write_text
from rlhf_core.config import ModelConfig, SFTConfig, TokenizeConfig
from rlhf_core.data import formats
from rlhf_core.data.encoding import tokenize_datasets
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.errors import TrainingError
from rlhf_core.stages import lm
from rlhf_core.training.modeling import build_tiny_causal_lm, check_tokenizer_fits, save_model

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
    return build_tiny_sft_project(tmp_path_factory.mktemp("reliability"), TINY)


def test_nan_loss_stops_the_stage_naming_step_and_keeps_the_last_checkpoint(tiny, monkeypatch):
    calls = {"n": 0}
    real = lm.batch_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, m = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), m

    monkeypatch.setattr(lm, "batch_loss", poisoned)
    cfg = SFTConfig(max_steps=6, batch_size=8, save_every=2, eval_every=0, log_every=1, warmup_steps=1)
    with pytest.raises(TrainingError, match=r"sft: non-finite loss at step 3"):
        lm.run_sft(context("sft", cfg, tiny / "out", tiny / "ckpt", data=tiny / "tok", init=tiny / "base"), cfg, TINY)
    assert (tiny / "ckpt" / "trainer_state.json").exists(), "the step-2 checkpoint is kept"
    assert not (tiny / "out").exists(), "no final model is written, so nothing can be registered"


def test_a_save_that_misses_its_weights_never_replaces_the_good_model(tiny, monkeypatch):
    from rlhf_core.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny / "base")
    model = build_tiny_causal_lm(TINY, tok)
    before = (tiny / "base" / "model.safetensors").read_bytes()
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, path, **kw: (Path(path) / "config.json").write_text("{}"))
    with pytest.raises(TrainingError, match="incomplete.*safetensors"):
        save_model(model, tok, tiny / "base")
    assert (tiny / "base" / "model.safetensors").read_bytes() == before


def test_tokenizer_that_does_not_fit_the_model_is_refused(tiny):
    from rlhf_core.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny / "base")
    small = build_tiny_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 tok)
    small.resize_token_embeddings(len(tok) - 5)
    with pytest.raises(TrainingError, match="tokenizer has .* tokens but the model embeds only"):
        check_tokenizer_fits(small, tok, "models/sft")


# --- post-conditions on shapes: tokenised data and saved weights ---------------------------------

def _ds(**cols):
    from datasets import Dataset

    return Dataset.from_dict(cols)


GOOD = {
    "pt": dict(input_ids=[[1, 2, 3, 4], [5, 6, 7, 8]]),
    "sft": dict(input_ids=[[1, 2, 3], [4, 5, 6, 7]], labels=[[-100, 2, 3], [-100, -100, 6, 7]]),
    "preference": dict(prompt_ids=[[1, 2]], chosen_ids=[[3]], rejected_ids=[[4, 5]], weight=[0.5]),
    "prompts": dict(prompt_ids=[[1, 2], [3]]),
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_well_formed_splits_pass_the_shape_check(kind):
    from rlhf_core.data.splits import check_split

    check_split(_ds(**GOOD[kind]), kind, "tok", vocab_size=9, block_size=4 if kind == "pt" else None)


BAD = [
    ("sft", dict(input_ids=[[1, 2]]), r"tok: has columns \['input_ids'\], but 'sft' data needs exactly "
                                      r"\['input_ids', 'labels'\] \[columns\]"),
    ("prompts", dict(prompt_ids=[[1]], extra=[0]), r"\[columns\]"),
    ("sft", dict(input_ids=[[1, 2, 3], [1, 2, 3, 4]], labels=[[-100, 2, 3], [-100, 2, 3]]),
     r"tok: row 1: 'labels' has 3 tokens but 'input_ids' has 4 \[labels_aligned\]"),
    ("sft", dict(input_ids=[[1, 2, 3], [4, 5]], labels=[[-100, 2], [-100, 5, 6]]),  # same total, rows differ
     r"tok: row 0: 'labels' has 2 tokens but 'input_ids' has 3 \[labels_aligned\]"),
    ("sft", dict(input_ids=[[1, 2, 3]], labels=[[-100, 2, 4]]),
     r"row 0: 'labels' differs from 'input_ids' at an unmasked position \[labels_aligned\]"),
    ("sft", dict(input_ids=[[1, 2], [1, 2]], labels=[[-100, 2], [-100, -100]]), r"row 1: every label is masked"),
    ("pt", dict(input_ids=[[1, 2, 3, 4], [1, 2, 3]]), r"row 1: block has 3 tokens, expected block_size 4 \[block_size\]"),
    ("prompts", dict(prompt_ids=[[1], [2, 9]]), r"row 1: 'prompt_ids' holds token id 9, outside the tokenizer's "
                                                r"\[0, 9\) \[token_range\]"),
    ("prompts", dict(prompt_ids=[[1], [-3]]), r"row 1: .*token id -3.*\[token_range\]"),
    ("prompts", dict(prompt_ids=[[1], []]), r"row 1: 'prompt_ids' is empty \[non_empty\]"),
    ("preference", dict(prompt_ids=[[1]] * 2, chosen_ids=[[2]] * 2, rejected_ids=[[3]] * 2, weight=[1.0, float("nan")]),
     r"row 1: 'weight' is nan, must be finite and > 0 \[weight\]"),
    ("prompts", dict(prompt_ids=["hello"]), r"column 'prompt_ids' is string, expected a list of integer token ids \[dtype\]"),
]


def _saved(tmp_path, **cols):
    """`cols` as the training stages read them: saved as the tokenize stage saves, read back as a `Split`."""
    from rlhf_core.data.splits import read_split

    _ds(**cols).save_to_disk(str(tmp_path / "split"))
    return read_split(tmp_path / "split")


@pytest.mark.parametrize("form", ["dataset", "split"])
@pytest.mark.parametrize("kind,cols,message", BAD, ids=[m.split("[")[-1].rstrip("]\\") + f"-{i}"
                                                          for i, (_, _, m) in enumerate(BAD)])
def test_malformed_splits_are_named_with_row_and_rule(kind, cols, message, form, tmp_path):
    from rlhf_core.data.splits import check_split

    data = _ds(**cols) if form == "dataset" else _saved(tmp_path, **cols)
    with pytest.raises(TrainingError, match=message):
        check_split(data, kind, "tok", vocab_size=9, block_size=4 if kind == "pt" else None)


def test_a_truncated_split_file_is_named_not_shown_as_an_arrow_traceback(tmp_path):
    from rlhf_core.data.splits import load_split

    _ds(**GOOD["sft"]).save_to_disk(str(tmp_path / "sft" / "train"))
    load_split(tmp_path, "sft", "train", vocab_size=9)
    arrow = next((tmp_path / "sft" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(TrainingError, match=rf"{tmp_path / 'sft' / 'train'}: cannot read the tokenised 'sft' data "
                                            r"\(ArrowInvalid: .*\); run the tokenize stage again"):
        load_split(tmp_path, "sft", "train", vocab_size=9)


def test_tokenize_whose_output_is_malformed_fails_and_keeps_the_good_data(tiny, monkeypatch):
    from rlhf_core.data import encoding

    convs = formats.read_conversations(tiny / "raw" / "sft.jsonl")
    tok = train_tokenizer([t.content for c in convs for t in c.turns], TINY.vocab_size)
    out = tiny / "tok"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = encoding.encode_sft

    def off_by_one(tokenizer, conv, max_length):
        ids, labels, truncated = real(tokenizer, conv, max_length)
        return ids, labels[:-1], truncated

    monkeypatch.setattr(encoding, "encode_sft", off_by_one)
    with pytest.raises(TrainingError, match=r"sft/train: row 0: 'labels' has \d+ tokens but 'input_ids' has \d+"):
        with atomic_dir(out) as tmp:  # as the tokenize stage writes it
            tokenize_datasets(tok, TokenizeConfig(max_length=64, block_size=32, max_prompt_length=32), tmp,
                              conversations=convs)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_training_refuses_tokenised_data_of_the_wrong_shape_before_touching_torch(tiny, tmp_path):
    import shutil

    from datasets import load_from_disk

    data = tmp_path / "tok"
    shutil.copytree(tiny / "tok", data)
    train = load_from_disk(str(tiny / "tok" / "sft" / "train")).remove_columns("labels")
    shutil.rmtree(data / "sft" / "train")
    train.save_to_disk(str(data / "sft" / "train"))
    cfg = SFTConfig(max_steps=2, batch_size=8, save_every=0, eval_every=0, warmup_steps=1)
    with pytest.raises(TrainingError, match=r"sft/train: has columns \['input_ids'\], but 'sft' data needs"):
        lm.run_sft(context("sft", cfg, tmp_path / "out", tmp_path / "ckpt", data=data, init=tiny / "base"), cfg,
                   TINY)
    # ids from another tokenizer: caught by range, not by an IndexError inside the embedding
    big = load_from_disk(str(tiny / "tok" / "sft" / "train")).map(lambda r: {"input_ids": [r["input_ids"][0] + 10_000] + r["input_ids"][1:]})
    shutil.rmtree(data / "sft" / "train")
    big.save_to_disk(str(data / "sft" / "train"))
    with pytest.raises(TrainingError, match=r"row 0: 'input_ids' holds token id \d+, outside the tokenizer's \[0, \d+\)"):
        lm.run_sft(context("sft", cfg, tmp_path / "out", tmp_path / "ckpt", data=data, init=tiny / "base"), cfg,
                   TINY)
    assert not (tmp_path / "out").exists()


def test_a_save_whose_weights_have_the_wrong_shape_never_replaces_the_good_model(tiny, monkeypatch):
    from rlhf_core.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny / "base")
    model = build_tiny_causal_lm(TINY, tok)
    before = (tiny / "base" / "model.safetensors").read_bytes()
    other = build_tiny_causal_lm(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=64,
                                             vocab_size=TINY.vocab_size), tok)
    real_save = type(model).save_pretrained
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, path, **kw: real_save(other, path, **kw))
    with pytest.raises(TrainingError, match=r"base: saved tensor '[^']+' has shape \[.*16.*\], the model's has "
                                            r"\[.*32.*\] \[shape\]"):
        save_model(model, tok, tiny / "base")
    assert (tiny / "base" / "model.safetensors").read_bytes() == before


def test_a_good_save_passes_the_shape_check_with_tied_weights_and_lora(tiny, tmp_path):
    from rlhf_core.config import LoraConfig
    from rlhf_core.data.tokenizer import load_tokenizer
    from rlhf_core.training.modeling import apply_lora, verify_saved

    tok = load_tokenizer(tiny / "base")
    model = build_tiny_causal_lm(TINY, tok)
    assert model.config.tie_word_embeddings
    save_model(model, tok, tmp_path / "full")
    peft_model = apply_lora(build_tiny_causal_lm(TINY, tok), LoraConfig(enabled=True, r=4))
    peft_model.save_pretrained(tmp_path / "adapters")
    tok.save_pretrained(tmp_path / "adapters")
    verify_saved(tmp_path / "adapters", "adapters", peft_model)
    with pytest.raises(TrainingError, match=r"adapters: saved weights are missing tensor '.*up_proj.lora_[AB].*' \[shape\]"):
        verify_saved(tmp_path / "adapters", "adapters",
                     apply_lora(build_tiny_causal_lm(TINY, tok), LoraConfig(enabled=True, r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))))
