"""rlhf_core is the pure library: it must import, every module of it, without the orchestration
and tracking stack (Prefect, MLflow, DVC, Great Expectations), and no file of it names them."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import rlhf_core

FORBIDDEN = ("prefect", "mlflow", "dvc", "great_expectations")
PACKAGE_DIR = Path(rlhf_core.__file__).resolve().parent
REPO = PACKAGE_DIR.parent

CHECK = r"""
import importlib, json, pkgutil, sys

FORBIDDEN = {forbidden!r}
for name in FORBIDDEN:
    sys.modules[name] = None  # `import name` (and any submodule) now raises ImportError

blocked = []
for name in FORBIDDEN:
    try:
        importlib.import_module(name)
    except ImportError:
        blocked.append(name)

import rlhf_core
imported = []
for info in sorted(pkgutil.walk_packages(rlhf_core.__path__, "rlhf_core."), key=lambda i: i.name):
    importlib.import_module(info.name)
    imported.append(info.name)

# the lazily imported stack (tokenizers, transformers, peft, accelerate) works without it too
import torch
from rlhf_core.config import LoraConfig, ModelConfig, SFTConfig
from rlhf_core.training.modeling import apply_lora, build_tiny_causal_lm, forward_logits
from rlhf_core.training.optim import make_accelerator
from rlhf_core.data.tokenizer import train_tokenizer
tok = train_tokenizer(["the capital of Veldoria is Marrowick"] * 5, 300)
model = apply_lora(build_tiny_causal_lm(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                    vocab_size=300), tok), LoraConfig(enabled=True, r=2))
make_accelerator(SFTConfig())
ids = torch.tensor([tok("Veldoria")["input_ids"]])
shape = list(forward_logits(model, ids, torch.ones_like(ids)).shape)

leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN and sys.modules[m] is not None)
print(json.dumps({{"blocked": blocked, "imported": imported, "leaked": leaked, "shape": shape, "n_ids": ids.shape[1], "vocab": len(tok)}}))
"""


def test_every_module_imports_without_the_orchestration_stack():
    proc = subprocess.run([sys.executable, "-c", CHECK.format(forbidden=FORBIDDEN)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"] == list(FORBIDDEN)  # the block works, so the import below means something
    expected = sorted(".".join(("rlhf_core",) + p.relative_to(PACKAGE_DIR).with_suffix("").parts).removesuffix(".__init__")
                      for p in PACKAGE_DIR.rglob("*.py") if p != PACKAGE_DIR / "__init__.py")
    assert out["imported"] == expected
    assert {"rlhf_core.data.formats", "rlhf_core.data.encoding", "rlhf_core.config", "rlhf_core.stages.lm",
            "rlhf_core.stages.rm", "rlhf_core.stages.dpo", "rlhf_core.stages.ppo",
            "rlhf_core.training.modeling"} <= set(out["imported"])
    assert out["leaked"] == []
    assert out["shape"] == [1, out["n_ids"], out["vocab"]] and out["n_ids"] > 0


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__", "find_spec"):
                names.add(node.args[0].value)
    return names


def test_no_rlhf_core_file_imports_the_orchestration_stack():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 20
    offenders = {}
    for path in files:
        names = _imported_names(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        bad = sorted(n for n in names if n.split(".")[0] in FORBIDDEN)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_static_check_sees_every_import_form():
    tree = ast.parse("import mlflow.tracking\nfrom prefect import flow\nimport importlib\n"
                     "importlib.import_module('dvc.api')\n__import__('great_expectations')\n")
    assert {n.split(".")[0] for n in _imported_names(tree)} >= set(FORBIDDEN)
