"""Model and tokenizer loading from local HF directories (safetensors only unless allowed), clear
errors for missing paths, LoRA adapters (disabled adapters give the base model) and the
save_model / load_policy round trip."""
from __future__ import annotations

import os

import pytest
import torch

from rlhf_core.config import LoraConfig, ModelConfig
from rlhf_core.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer, train_tokenizer
from rlhf_core.errors import ModelLoadError
from rlhf_core.training.modeling import (
    apply_lora,
    build_tiny_causal_lm,
    forward_logits,
    is_peft,
    load_causal_lm,
    load_policy,
    save_model,
)

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=320)
LORA = LoraConfig(enabled=True, r=4, alpha=8)
CORPUS = ["What is the capital of Veldoria? Certainly! The capital of Veldoria is Marrowick."] * 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, TINY.vocab_size)


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["What is the capital of Veldoria?", "Marrowick"], add_special_tokens=False, padding=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def hf_llama(tok, seed: int = 0):
    """A tiny LlamaForCausalLM built with transformers directly (not through rlhf_core)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id, bos_token_id=None)).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return forward_logits(model, *batch)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok):
    """A local HF model directory written by save_pretrained (safetensors) with its tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "llama"
    model = hf_llama(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


# --- loading ---------------------------------------------------------------------------------

def test_load_local_hf_model_and_tokenizer(saved_model, tok, batch):
    path, original = saved_model
    assert (path / "model.safetensors").is_file()
    model = load_causal_lm(path, ModelConfig())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(model, batch), logits(original, batch))
    loaded = load_tokenizer(path)
    text = "Certainly! The capital of Veldoria is Marrowick."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert loaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True) == "<|user|>Hi<|assistant|>"


def test_tokenizer_without_pad_and_template_gets_defaults(tmp_path):
    t = train_tokenizer(["abc abd"] * 5, 300)
    t.pad_token = None
    t.chat_template = None
    t.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded.pad_token_id == loaded.eos_token_id == 0
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.fixture
def pickle_only_dir(tmp_path, tok):
    model = hf_llama(tok, seed=1)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    return tmp_path, model


def test_pickle_only_weights_are_refused(pickle_only_dir):
    path, _ = pickle_only_dir
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm(path, ModelConfig())
    msg = str(info.value)
    assert str(path) in msg and "pickle" in msg and "safetensors" in msg and "pytorch_model.bin" in msg
    assert "allow_pickle" in msg


def test_pickle_only_weights_load_when_allowed(pickle_only_dir, batch):
    path, original = pickle_only_dir
    model = load_causal_lm(path, ModelConfig(allow_pickle=True))
    assert torch.equal(logits(model, batch), logits(original, batch))


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    for load in (lambda: load_causal_lm(missing, ModelConfig()), lambda: load_tokenizer(missing),
                 lambda: load_policy(missing, ModelConfig())):
        with pytest.raises(ModelLoadError) as info:
            load()
        assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_directory_without_weights(tmp_path, tok):
    hf_llama(tok).config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm(tmp_path, ModelConfig())
    assert str(tmp_path) in str(info.value) and "no model weights" in str(info.value)


# --- LoRA ------------------------------------------------------------------------------------

def _train_adapters_one_step(model, batch) -> None:
    from rlhf_core.ops.losses import lm_loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, mask = batch
    loss, _ = lm_loss(forward_logits(model, ids, mask), ids.masked_fill(mask == 0, -100))
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_apply_lora_disabled_returns_the_model(tok):
    model = build_tiny_causal_lm(TINY, tok)
    assert apply_lora(model, LoraConfig(enabled=False)) is model and not is_peft(model)


def test_lora_disable_adapter_gives_base_logits(tok, batch):
    model = build_tiny_causal_lm(TINY, tok, seed=0)
    base = logits(model, batch).clone()
    peft_model = apply_lora(model, LORA)
    assert is_peft(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 4 attention projections x 2 layers x (A, B)
    assert len(trainable) == 16
    assert torch.allclose(logits(peft_model, batch), base, atol=1e-6)  # B starts at zero
    _train_adapters_one_step(peft_model, batch)
    tuned = logits(peft_model, batch)
    assert (tuned - base).abs().max() > 1e-4  # the adapters changed the output
    with peft_model.disable_adapter():
        assert torch.allclose(logits(peft_model, batch), base, atol=1e-6)
    assert torch.allclose(logits(peft_model, batch), tuned, atol=1e-6)  # re-enabled afterwards


def test_save_model_load_policy_round_trip_of_lora(saved_model, tok, batch, tmp_path):
    base_dir, _ = saved_model
    peft_model = apply_lora(load_causal_lm(base_dir, TINY), LORA)
    _train_adapters_one_step(peft_model, batch)
    tuned = logits(peft_model, batch)

    save_model(peft_model, tok, tmp_path / "adapters")
    files = set(os.listdir(tmp_path / "adapters"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    loaded = load_policy(tmp_path / "adapters", TINY)
    assert is_peft(loaded)
    assert torch.allclose(logits(loaded, batch), tuned, atol=1e-6)
    assert load_tokenizer(tmp_path / "adapters")("Veldoria")["input_ids"] == tok("Veldoria")["input_ids"]

    save_model(peft_model, tok, tmp_path / "merged", merge_lora=True)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = load_policy(tmp_path / "merged", TINY)
    assert not is_peft(merged)
    assert torch.allclose(logits(merged, batch), tuned, atol=1e-5)


def test_load_policy_refuses_pickle_adapter_weights(saved_model, tok, tmp_path):
    """Safe by default applies to adapters too: an adapter directory holding only pickle weights
    (adapter_model.bin) is refused unless allow_pickle is set."""
    from safetensors.torch import load_file

    base_dir, _ = saved_model
    save_model(apply_lora(load_causal_lm(base_dir, TINY), LORA), tok, tmp_path / "adapters")
    weights = tmp_path / "adapters" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "adapters" / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError) as info:
        load_policy(tmp_path / "adapters", TINY)
    assert "pickle" in str(info.value) and "adapter_model.bin" in str(info.value)
    assert is_peft(load_policy(tmp_path / "adapters", ModelConfig(allow_pickle=True)))


# --- precision, gradient checkpointing, portable adapters -------------------------------------

def test_a_bf16_checkpoint_loads_as_fp32_master_weights_unless_asked(tok, tmp_path):
    path = tmp_path / "bf16"
    hf_llama(tok).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    assert {p.dtype for p in load_causal_lm(path, ModelConfig()).parameters()} == {torch.float32}
    assert {p.dtype for p in load_causal_lm(path, ModelConfig(dtype="bfloat16")).parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_gradients(tok, batch):
    from rlhf_core.training.modeling import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = apply_lora(hf_llama(tok), LORA)
        if checkpointing:
            enable_gradient_checkpointing(model)
            base = model.get_base_model()
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        model.train()
        forward_logits(model, *batch).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_an_adapter_names_its_base_relative_to_itself_and_loads_after_the_project_moves(
        saved_model, tok, batch, tmp_path, monkeypatch):
    import json
    import shutil

    project = tmp_path / "project"
    shutil.copytree(saved_model[0], project / "models" / "sft")
    monkeypatch.chdir(project)  # stages run in the project root
    peft_model = apply_lora(load_causal_lm(project / "models" / "sft", TINY), LORA)
    _train_adapters_one_step(peft_model, batch)
    tuned = logits(peft_model, batch)
    save_model(peft_model, tok, project / "models" / "dpo")
    conf = json.loads((project / "models" / "dpo" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == os.path.join("..", "sft")

    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    monkeypatch.chdir(tmp_path)
    loaded = load_policy(moved / "models" / "dpo", TINY)
    assert torch.allclose(logits(loaded, batch), tuned, atol=1e-6)
    merged = load_causal_lm(moved / "models" / "dpo", TINY)  # what the next stage trains from
    assert not is_peft(merged) and merged.name_or_path == str(moved / "models" / "dpo")
    assert torch.allclose(logits(merged, batch), tuned, atol=1e-5)


def test_an_adapter_on_a_hub_id_or_outside_base_keeps_the_name_as_given(tmp_path, monkeypatch):
    from rlhf_core.training.modeling import portable_base

    inside, outside = tmp_path / "p" / "models" / "sft", tmp_path / "cache" / "smollm2"
    inside.mkdir(parents=True), outside.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "p")
    assert portable_base("HuggingFaceTB/SmolLM2-135M-Instruct", "models/rm") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base(str(outside), "models/pt") == str(outside)
    assert portable_base(str(inside), tmp_path / "p" / "models" / "rm") == os.path.join("..", "sft")


def test_stage_processes_load_and_train_models_without_importing_scipy():
    """`import_model_code_without_scipy`: in a fresh interpreter, the stages' model code (a tiny
    model built, LoRA applied, peft and TRL imported, a forward and backward run) never imports
    scipy, which transformers would load for its object-detection losses (40 MB resident), while
    transformers still reports scipy as available afterwards. scipy is installed here, so without
    the lever the first check fails."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("scipy") is not None, "the check needs scipy installed"
    code = """
import sys
import torch
import rlhf_core.stages.lm, rlhf_core.stages.ppo
import peft, trl
from rlhf_core.config import LoraConfig, ModelConfig
from rlhf_core.data.tokenizer import train_tokenizer
from rlhf_core.training.modeling import apply_lora, build_tiny_causal_lm
tok = train_tokenizer(["What is the capital of Veldoria? Marrowick."] * 20, 320)
m = apply_lora(build_tiny_causal_lm(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                                vocab_size=320), tok), LoraConfig(enabled=True, r=4, alpha=8))
m(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
from transformers.utils import is_scipy_available
print("scipy" in sys.modules, is_scipy_available())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]
