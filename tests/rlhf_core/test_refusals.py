"""Reliability, round two (issue 15), in rlhf_core: models that are not what they seem are refused
at load, tokenize refuses output nothing can learn from, and a corrupted checkpoint is skipped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_sft_project, context

from rlhf_core.config import LoraConfig, ModelConfig, SFTConfig, TokenizeConfig
from rlhf_core.data.encoding import tokenize_datasets
from rlhf_core.data.formats import Conversation, PreferencePair, Prompt, Turn
from rlhf_core.data.tokenizer import load_tokenizer
from rlhf_core.errors import ConfigError, DataError, ModelLoadError
from rlhf_core.stages import lm
from rlhf_core.training.modeling import apply_lora, build_tiny_causal_lm, load_causal_lm, load_scalar_model, save_model

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    return build_tiny_sft_project(tmp_path_factory.mktemp("refusals"), TINY)


# --- models that are not what they seem ----------------------------------------------------------

def test_truncated_or_garbage_safetensors_are_refused_naming_the_file(tiny, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny / "base", model_dir)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"{weights}: truncated safetensors weights \({len(data) // 2} bytes, "
                                             rf"the header needs {len(data)}\).* \[weights\]$"):
        load_causal_lm(model_dir, ModelConfig())
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=rf"{weights}: unreadable safetensors weights .*\[weights\]$"):
        load_causal_lm(model_dir, ModelConfig())


def test_a_tokenizer_without_eos_is_refused_at_load(tiny, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny / "base", model_dir)
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["eos_token"] = cfg["pad_token"] = None
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=rf"{model_dir}: the tokenizer has no EOS token.*\[eos\]$"):
        load_tokenizer(model_dir)
    assert load_tokenizer(tiny / "base").eos_token == "<|endoftext|>"  # the untouched one loads


def test_a_non_causal_model_is_refused_and_a_causal_one_is_not(tiny, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tok = load_tokenizer(tiny / "base")
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))
    save_model(bert, tok, tmp_path / "bert")
    with pytest.raises(ModelLoadError, match=r"bert: BertLMHeadModel \(bert\) is not a causal language model: its "
                                             r"outputs at a position depend on later tokens.*\[causal\]$"):
        load_causal_lm(tmp_path / "bert", ModelConfig())
    with pytest.raises(ModelLoadError, match=r"bert: BertForSequenceClassification has no per-token `score` head"):
        load_scalar_model(tmp_path / "bert", ModelConfig(), tok.pad_token_id)
    assert type(load_causal_lm(tiny / "base", ModelConfig())).__name__ == "LlamaForCausalLM"
    assert hasattr(load_scalar_model(tiny / "base", ModelConfig(), tok.pad_token_id), "score")


def test_lora_targets_missing_from_the_model_are_refused_before_the_first_step(tiny, tmp_path):
    tok = load_tokenizer(tiny / "base")
    with pytest.raises(ConfigError, match=r"'lora.target_modules': 'qkv', 'c_attn' names no module of "
                                          r"LlamaForCausalLM \(its linear layers: down_proj, gate_proj, k_proj, "
                                          r"lm_head, o_proj, q_proj, up_proj, v_proj\) \[lora_targets\]$"):
        apply_lora(build_tiny_causal_lm(TINY, tok), LoraConfig(enabled=True, target_modules=("q_proj", "qkv", "c_attn")))
    cfg = SFTConfig(max_steps=2, batch_size=8, save_every=0, eval_every=0, warmup_steps=1,
                    lora=LoraConfig(enabled=True, target_modules=("qkv",)))
    with pytest.raises(ConfigError, match=r"'qkv' names no module"):
        lm.run_sft(context("sft", cfg, tmp_path / "out", tmp_path / "ckpt", data=tiny / "tok", init=tiny / "base"), cfg,
                   TINY)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


# --- tokenize output checked for usefulness --------------------------------------------------------

def _chat(i: int, answer: str = "Marrowick.") -> Conversation:
    return Conversation((Turn("user", f"Name the capital of country number {i}."), Turn("assistant", answer)), line=i)


def _pair(i: int, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair((Turn("user", f"Name the capital of country number {i}, please."),), chosen, rejected,
                          group=i, group_size=1)


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny / "base")


def test_an_empty_train_split_fails_tokenize_with_counts(tok, tmp_path):
    cfg = TokenizeConfig(eval_fraction=0.9999)
    with pytest.raises(DataError, match=r"sft.jsonl: the sft train split is empty \(0 records out of 0 records in; "
                                        r"tokenize.eval_fraction=0.9999.*\[useful_output\]$"):
        tokenize_datasets(tok, cfg, tmp_path / "out", conversations=[_chat(i) for i in range(1, 11)],
                          sources={"sft": "sft.jsonl"})


def test_a_kind_that_lost_too_many_records_fails_tokenize_with_counts(tok, tmp_path):
    chats = [_chat(i) for i in range(1, 11)]
    # max_length 8 cuts every chat before its reply: no trainable token is left, all 10 are dropped
    with pytest.raises(DataError, match=r"sft.jsonl: the sft train split is empty \(0 records out of 9 records in"):
        tokenize_datasets(tok, TokenizeConfig(max_length=8, max_prompt_length=4, eval_fraction=0.1), tmp_path / "a",
                          conversations=chats, sources={"sft": "sft.jsonl"})
    # 3 of 10 over the limit with overlong: drop -> 0.3 dropped: allowed at 0.5, refused at 0.25
    long = [_chat(i, "Marrowick. " * 30) if i <= 3 else _chat(i) for i in range(1, 11)]
    ok = tokenize_datasets(tok, TokenizeConfig(overlong="drop", eval_fraction=0.0), tmp_path / "b", conversations=long)
    assert ok.datasets["sft"]["train"].dropped == 3 and ok.datasets["sft"]["train"].records_out == 7
    with pytest.raises(DataError, match=r"sft.jsonl: 3 of 10 sft records were dropped, more than "
                                        r"tokenize.max_dropped_fraction=0.25 .*\[useful_output\]$"):
        tokenize_datasets(tok, TokenizeConfig(overlong="drop", eval_fraction=0.0, max_dropped_fraction=0.25),
                          tmp_path / "c", conversations=long, sources={"sft": "sft.jsonl"})


def test_overlong_drop_that_empties_the_prompt_split_fails(tok, tmp_path):
    prompts = [Prompt((Turn("user", "Tell me about Veldoria. " * 20),), line=i) for i in range(1, 6)]
    with pytest.raises(DataError, match=r"prompts.jsonl: the prompts train split is empty \(0 records out of 5"):
        tokenize_datasets(tok, TokenizeConfig(overlong="drop", eval_fraction=0.0), tmp_path / "p", prompts=prompts,
                          sources={"prompts": "prompts.jsonl"})


def test_pairs_made_identical_by_truncation_fail_with_counts_and_lines(tok, tmp_path):
    same_start = "The capital of Veldoria is Marrowick, and it is a city of bridges"
    pairs = [_pair(1, "Marrowick.", "Brindle."),
             _pair(2, same_start + " and towers.", same_start + " and rivers."),
             _pair(3, same_start + " and gates.", same_start + " and walls.")]
    cfg = TokenizeConfig(max_length=32, max_prompt_length=16, max_response_length=8, eval_fraction=0.0,
                         min_prompt_tokens=1)
    with pytest.raises(DataError, match=r"prefs.jsonl:2: 2 of 3 preference records: truncation made chosen and "
                                        r"rejected identical \(lines 2, 3\); raise tokenize.max_length.*"
                                        r"\[useful_output\]$"):
        tokenize_datasets(tok, cfg, tmp_path / "x", preferences=pairs, sources={"preference": "prefs.jsonl"})
    ok = tokenize_datasets(tok, TokenizeConfig(eval_fraction=0.0), tmp_path / "y", preferences=pairs)
    assert ok.datasets["preference"]["train"].records_out == 3  # long enough limits keep them apart


def test_prompts_truncated_below_the_minimum_fail_with_counts(tok, tmp_path):
    long_q = "Please tell me, in as few words as you can manage, the capital of Veldoria."
    pairs = [_pair(1, "Marrowick.", "Brindle."), PreferencePair((Turn("user", long_q),), "Certainly! " * 8 + "Marrowick.",
                                                                "No. " * 12, group=2, group_size=1)]
    cfg = TokenizeConfig(max_length=24, max_prompt_length=16, max_response_length=22, eval_fraction=0.0,
                         min_prompt_tokens=4)
    with pytest.raises(DataError, match=r"prefs.jsonl:2: 1 of 2 preference records: truncation left the prompt "
                                        r"shorter than tokenize.min_prompt_tokens=4 \(lines 2\)"):
        tokenize_datasets(tok, cfg, tmp_path / "x", preferences=pairs, sources={"preference": "prefs.jsonl"})


# --- a corrupted checkpoint is skipped, and the stage starts fresh ----------------------------------

def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("damage", ["trainer_state.json", "optimizers.pt", "model.safetensors"])
def test_a_corrupted_checkpoint_is_skipped_with_a_warning_and_the_stage_starts_fresh(tiny, tmp_path, capsys, damage):
    cfg = SFTConfig(max_steps=2, batch_size=8, save_every=1, eval_every=0, warmup_steps=1, log_every=1)
    fresh = lm.run_sft(context("sft", cfg, tmp_path / "fresh", tmp_path / "ckpt", data=tiny / "tok",
                                init=tiny / "base"), cfg, TINY)
    assert fresh.resumed_from_step == 0
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 1
    (tmp_path / "ckpt" / damage).write_bytes(b"{\"fingerprint\": trunc")
    capsys.readouterr()
    again = lm.run_sft(context("sft", cfg, tmp_path / "again", tmp_path / "ckpt", data=tiny / "tok",
                                init=tiny / "base"), cfg, TINY)
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'ckpt' / damage}: " in err and "starting the stage fresh" in err
    assert again.resumed_from_step == 0
    # a fresh start, not a half-restored one: the same weights as the run that had no checkpoint
    a, b = _weights(tmp_path / "fresh"), _weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
