"""Stage configs and params.yaml: unknown keys, wrong types and values out of range fail early,
naming the key; the shipped params.yaml builds every group."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.config import (
    DPOConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PPOConfig,
    PTConfig,
    RMConfig,
    SFTConfig,
    TokenizeConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from rlhf_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _config_error(cls, data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return info.value


# --- from_dict -------------------------------------------------------------------------------

def test_unknown_key_is_named():
    err = _config_error(SFTConfig, {"learning_rate": 1e-3, "learnin_rate": 1e-3})
    assert err.key == "learnin_rate"
    assert "'learnin_rate'" in str(err) and "unknown key" in str(err)
    assert "learning_rate" in err.rule  # the allowed keys are listed


def test_str_for_float_is_rejected():
    err = _config_error(PTConfig, {"learning_rate": "1e-3"})
    assert err.key == "learning_rate"
    assert "must be float, got str" in str(err)


@pytest.mark.parametrize("cls, data, key", [
    (TrainConfig, {"batch_size": 16.0}, "batch_size"),       # float for int
    (TrainConfig, {"batch_size": True}, "batch_size"),       # bool is not an int here
    (TrainConfig, {"learning_rate": False}, "learning_rate"),
    (ModelConfig, {"allow_pickle": "yes"}, "allow_pickle"),
    (ModelConfig, {"name_or_path": 3}, "name_or_path"),
    (LoraConfig, {"target_modules": "q_proj"}, "target_modules"),
    (SFTConfig, {"lora": [1, 2]}, "lora"),
])
def test_wrong_types(cls, data, key):
    err = _config_error(cls, data)
    assert err.key == key and f"'{key}'" in str(err)


@pytest.mark.parametrize("cls, data, key", [
    (SFTConfig, {"learning_rate": -1e-3}, "learning_rate"),
    (SFTConfig, {"learning_rate": 0}, "learning_rate"),
    (DPOConfig, {"beta": 0.0}, "beta"),
    (DPOConfig, {"beta": -0.1}, "beta"),
    (TokenizeConfig, {"block_size": 0}, "block_size"),
    (TokenizeConfig, {"eval_fraction": 1.0}, "eval_fraction"),
    (TokenizeConfig, {"max_length": 32, "max_prompt_length": 32}, "max_prompt_length"),
    (TrainConfig, {"max_steps": 0}, "max_steps"),
    (TrainConfig, {"lr_scheduler": "step"}, "lr_scheduler"),
    (PPOConfig, {"batch_size": 16, "rollout_batch_size": 24}, "rollout_batch_size"),
    (PPOConfig, {"top_p": 0.0}, "top_p"),
    (RMConfig, {"center_coef": -1.0}, "center_coef"),
    (ModelConfig, {"vocab_size": 299}, "vocab_size"),
    (ModelConfig, {"hidden_size": 30, "num_heads": 4}, "hidden_size"),
    (EvalConfig, {"num_samples": 0}, "num_samples"),
])
def test_out_of_range(cls, data, key):
    err = _config_error(cls, data)
    assert err.key == key and f"'{key}'" in str(err)


def test_ints_accepted_for_floats():
    cfg = from_dict(DPOConfig, {"learning_rate": 1, "beta": 2, "max_grad_norm": 0})
    assert (cfg.learning_rate, cfg.beta, cfg.max_grad_norm) == (1.0, 2.0, 0.0)
    assert type(cfg.learning_rate) is float and type(cfg.beta) is float


def test_nested_lora_dict():
    cfg = from_dict(SFTConfig, {"max_steps": 7, "lora": {"enabled": True, "r": 4, "alpha": 8,
                                                         "target_modules": ["q_proj", "v_proj"]}})
    assert cfg.max_steps == 7
    assert cfg.lora == LoraConfig(enabled=True, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    assert to_dict(cfg)["lora"]["target_modules"] == ("q_proj", "v_proj")


@pytest.mark.parametrize("lora, key", [
    ({"rank": 4}, "lora.rank"),
    ({"r": 0}, "lora.r"),
    ({"dropout": "0.1"}, "lora.dropout"),
])
def test_nested_lora_errors_carry_the_prefix(lora, key):
    err = _config_error(SFTConfig, {"lora": lora})
    assert err.key == key and f"'{key}'" in str(err)


def test_empty_or_none_mapping_gives_defaults():
    assert from_dict(RMConfig, None) == RMConfig()
    assert from_dict(RMConfig, {}) == RMConfig()


# --- params.yaml -----------------------------------------------------------------------------

def test_shipped_params_yaml_builds_every_group():
    from tasks.params import GROUPS, Params, load_params

    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    for group, cls in GROUPS.items():
        assert isinstance(getattr(p, group), cls), group
    # every value in the file reaches its dataclass unchanged
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(p, group), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{group}.{key}"  # YAML lists are tuples


def _params_error(raw) -> ConfigError:
    from tasks.params import parse_params

    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return info.value


@pytest.mark.parametrize("raw, key", [
    ({"dpoo": {}}, "dpoo"),
    ({"dpo": {"betaa": 0.1}}, "dpo.betaa"),
    ({"tokenize": {"block_size": 512}}, "tokenize.block_size"),
    ({"model": {"max_position_embeddings": 100}, "tokenize": {"max_length": 128, "block_size": 64}},
     "tokenize.max_length"),
    ({"sft": {"learning_rate": -0.001}}, "sft.learning_rate"),
    ({"pt": {"learning_rate": -1}}, "pt.learning_rate"),
    ({"rm": {"batch_size": "16"}}, "rm.batch_size"),
    ({"ppo": {"lora": {"r": -1}}}, "ppo.lora.r"),
])
def test_parse_params_errors_name_the_key(raw, key):
    err = _params_error(raw)
    assert err.key == key
    assert f"'{key}'" in str(err) and str(err).startswith("params.yaml: ")


def test_params_block_size_within_context_is_accepted():
    from tasks.params import parse_params

    p = parse_params({"model": {"max_position_embeddings": 64}, "tokenize": {"max_length": 64, "block_size": 64,
                                                                            "max_prompt_length": 32},
                      "ppo": {"max_new_tokens": 32}, "evaluate": {"max_new_tokens": 32}})
    assert p.tokenize.block_size == 64 and p.model.max_position_embeddings == 64


def test_params_empty_group_uses_defaults_but_an_empty_file_is_refused(tmp_path):
    from tasks.params import load_params, parse_params

    assert parse_params({"dpo": None}).dpo == DPOConfig()
    empty = tmp_path / "params.yaml"
    for text in ("", "# only a comment\n"):
        empty.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"params.yaml: is empty; .*\[empty\]$"):
            load_params(empty)


def test_a_ppo_minibatch_larger_than_the_rollout_is_a_config_error():
    """batch_size * grad_accum > rollout_batch_size used to run zero updates, silently."""
    err = _config_error(PPOConfig, {"batch_size": 8, "grad_accum": 2, "rollout_batch_size": 8})
    assert err.key == "rollout_batch_size" and "batch_size * grad_accum" in err.rule
    assert from_dict(PPOConfig, {"batch_size": 4, "grad_accum": 2, "rollout_batch_size": 12}).rollout_batch_size == 12


def test_precision_and_memory_settings():
    assert from_dict(ModelConfig, {}).dtype == "float32"
    assert _config_error(ModelConfig, {"dtype": "auto"}).key == "dtype"
    assert _config_error(PPOConfig, {"ptx_data": "chats"}).key == "ptx_data"
    assert _config_error(PPOConfig, {"vf_coef": 0.5}).key == "vf_coef"  # removed: it had no effect
    cfg = from_dict(PPOConfig, {"gradient_checkpointing": True, "critic_lora": {"enabled": True, "r": 4}})
    assert cfg.gradient_checkpointing and cfg.critic_lora.r == 4


def test_compile_is_for_the_stages_that_do_not_generate():
    assert all(from_dict(cls, {"compile": True}).compile for cls in (PTConfig, SFTConfig, RMConfig, DPOConfig))
    err = _config_error(PPOConfig, {"compile": True})
    assert err.key == "compile" and "not supported for PPO" in str(err)
    assert from_dict(PPOConfig, {}).compile is False
