"""Safe by default: no shell strings, no remote code, no pickle unless asked."""
import ast
from pathlib import Path

from rlhf_core.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_no_subprocess_call_uses_a_shell():
    offenders = []
    for f in [*ROOT.glob("rlhf_core/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{f.name}:{node.lineno}")
                if getattr(node.func, "attr", "") == "system" and getattr(node.func.value, "id", "") == "os":
                    offenders.append(f"{f.name}:{node.lineno}")
    assert not offenders


def test_remote_code_and_pickle_are_off_unless_set(tmp_path):
    cfg = ModelConfig()
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False
    shipped = (ROOT / "params.yaml").read_text()
    assert "trust_remote_code: true" not in shipped and "allow_pickle: true" not in shipped


def test_loaders_pass_the_safety_switches_to_transformers(tmp_path, monkeypatch):
    import transformers
    from safetensors.torch import save_file

    from rlhf_core.training import modeling

    save_file({}, str(tmp_path / "model.safetensors"))  # a valid (empty) file: the header check passes
    monkeypatch.setattr(modeling, "check_causal", lambda model, where: None)  # the fake model is a string
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return "model"

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    assert modeling.load_causal_lm(tmp_path, ModelConfig()) == "model"
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    modeling.load_causal_lm(tmp_path, ModelConfig(trust_remote_code=True, allow_pickle=True))
    assert seen["trust_remote_code"] is True and seen["use_safetensors"] is None
