"""params.yaml mistakes are found before any work starts, naming the file, line or key and the rule."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core.errors import ConfigError
from tasks.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def _load_error(tmp_path, text: str) -> str:
    f = tmp_path / "params.yaml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_params(f)
    return str(info.value)


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    msg = _load_error(tmp_path, "dpo:\n  beta: 0.1\nsft:\n  max_steps: [3\n  batch_size: 8\n")
    assert msg.startswith(f"{tmp_path / 'params.yaml'}:5: is not valid YAML: ") and msg.endswith("[yaml]")


@pytest.mark.parametrize("text, line, key", [
    ("dpo:\n  beta: 0.1\n  rpo_alpha: 1.0\n  beta: 0.2\n", 4, "beta"),   # inside a group
    ("sft:\n  max_steps: 3\ndpo:\n  beta: 0.1\nsft:\n  max_steps: 5\n", 5, "sft"),  # a whole group twice
])
def test_a_duplicate_key_is_refused_like_dvc_does(tmp_path, text, line, key):
    msg = _load_error(tmp_path, text)
    first = 2 if key == "beta" else 1
    assert msg == (f"{tmp_path / 'params.yaml'}:{line}: is not valid YAML: duplicate key '{key}' "
                   f"(first on line {first}) [yaml]")


@pytest.mark.parametrize("raw, key, rule", [
    ({"tracking": {"experiment": ""}}, "tracking.experiment", "must be a non-empty MLflow experiment name"),
    ({"tracking": {"experiment": "   "}}, "tracking.experiment", "non-empty"),
    ({"tracking": {"registry_prefix": "team/rlhf"}}, "tracking.registry_prefix", "contains '/'"),
    ({"tracking": {"registry_prefix": "team:rlhf"}}, "tracking.registry_prefix", "contains ':'"),
    ({"tracking": {"registry_prefix": "rlhf@v2"}}, "tracking.registry_prefix", "contains '@'"),
    ({"tracking": {"registry_prefix": ""}}, "tracking.registry_prefix", "must be non-empty"),
    ({"ppo": {"top_k": -1}}, "ppo.top_k", "must be >= 0 (0 = off)"),
    ({"ppo": {"temperature": 0.0}}, "ppo.temperature", "must be > 0"),
    ({"evaluate": {"max_new_tokens": 0}}, "evaluate.max_new_tokens", "must be > 0"),
    ({"tokenize": {"max_dropped_fraction": 1.5}}, "tokenize.max_dropped_fraction", "must be in [0, 1]"),
    ({"tokenize": {"min_prompt_tokens": 0}}, "tokenize.min_prompt_tokens", "must be > 0"),
])
def test_values_mlflow_or_generation_would_refuse_late_are_refused_at_parse(raw, key, rule):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert info.value.key == key and rule in str(info.value)
    assert str(info.value).startswith(f"params.yaml: '{key}': ") and str(info.value).endswith("]")


def test_names_mlflow_accepts_pass():
    p = parse_params({"tracking": {"experiment": "team rlhf / nightly", "registry_prefix": "team.rlhf_v2-a"}})
    assert p.tracking.registry_prefix == "team.rlhf_v2-a"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 can run here")
def test_fp16_without_cuda_is_refused_instead_of_silently_running_fp32(tmp_path):
    msg = _load_error(tmp_path, "sft:\n  mixed_precision: fp16\n")
    assert msg == (f"{tmp_path / 'params.yaml'}: 'sft.mixed_precision': is fp16, which needs a CUDA GPU and none is "
                   "visible here; use 'no' (or 'bf16') [precision]")
    f = tmp_path / "params.yaml"
    f.write_text("sft:\n  mixed_precision: bf16\n")
    assert load_params(f).sft.mixed_precision == "bf16"  # bf16 runs on a CPU


def test_the_shipped_params_file_passes_every_check():
    assert load_params(REPO / "params.yaml").tracking.registry_prefix == "rlhf"
