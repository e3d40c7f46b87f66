"""A real pretrained chat model (SmolLM2-135M-Instruct, ChatML, pad == eos) through every stage of
the recipe (examples/smollm2.yaml) at two steps each with LoRA, in this process, with MLflow on
SQLite: SFT, the RM, the held-out judge RM, DPO, PPO and the evaluation judged by the held-out RM.
The registered models load back, and SFT still answers a plain question coherently."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow

TWO_STEPS = {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "save_every": 1, "eval_every": 0, "log_every": 1}


def make_sample(out, **kw):
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(out, **kw)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, smollm2_dir, one_torch_thread):
    """The recipe's params at two steps per stage, run stage by stage (no DVC: that is the demo's e2e)."""
    from tasks.stages import run_stage

    root = tmp_path_factory.mktemp("smollm2")
    make_sample(root / "data" / "sample", n_eval=3)  # 3 evaluation prompts, not 8
    p = yaml.safe_load((ROOT / "examples" / "smollm2.yaml").read_text())
    p["model"]["name_or_path"] = str(smollm2_dir)
    # short rows, and held-out splits of a few rows: each is scored by every model at the end of its stage
    p["tokenize"].update({"max_length": 96, "max_prompt_length": 64, "max_response_length": 32, "eval_fraction": 0.05})
    for stage in ("sft", "rm", "judge", "dpo"):
        p[stage].update(TWO_STEPS)
    p["ppo"].update({**TWO_STEPS, "rollout_batch_size": 2, "max_new_tokens": 8})
    p["evaluate"].update({"num_samples": 1, "max_new_tokens": 8})
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    results = {s: run_stage(s, root) for s in ("validate", "tokenize", "pt", "sft", "rm", "judge", "dpo", "ppo")}
    return root, results


def test_every_stage_trained_two_steps_with_lora(recipe):
    root, results = recipe
    assert results["pt"] == {"trained": False, "base": yaml.safe_load((root / "params.yaml").read_text())["model"]["name_or_path"]}
    for stage in ("sft", "rm", "judge", "dpo", "ppo"):
        assert results[stage]["steps"] == 2, stage
        assert results[stage]["registered"]["name"] == f"smollm2-{stage}"
    manifest = json.loads((root / "data/tokenized/manifest.json").read_text())
    assert manifest["preference"]["judge"]["records_out"] > 0  # the judge's own held-out share


def test_registered_models_load_back_and_sft_still_answers(recipe):
    import mlflow
    import torch

    from rlhf_core.config import ModelConfig
    from rlhf_core.data.tokenizer import load_tokenizer
    from rlhf_core.training.modeling import load_policy, load_scalar_model
    from tasks import tracking

    root, _ = recipe
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    paths = {s: mlflow.artifacts.download_artifacts(f"models:/smollm2-{s}@candidate") for s in ("sft", "rm", "dpo", "ppo")}
    cfg = ModelConfig()
    tok = load_tokenizer(paths["sft"])
    assert tok.eos_token == "<|im_end|>"
    for stage in ("rm",):
        assert load_scalar_model(paths[stage], cfg, tok.pad_token_id).config.num_labels == 1
    for stage in ("dpo", "ppo"):
        assert load_policy(paths[stage], cfg).config.vocab_size == len(tok)
    sft = load_policy(paths["sft"], cfg).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = sft.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert answer.endswith("<|im_end|>") and "Paris" in answer, answer


def test_evaluation_is_judged_by_the_heldout_rm(recipe):
    from tasks.stages import run_stage

    root, _ = recipe
    report = run_stage("evaluate", root)
    assert report["judge"] == "heldout_rm"
    assert report["promotion"]["judge"] == "heldout_rm" and "heldout_rm judge score" in report["promotion"]["reason"]
    assert report["sft"]["win_rate_vs_sft"] == 0.5 and report["sft"]["preference_accuracy"] == 0.5
    for model in ("dpo", "ppo"):
        assert 0.0 <= report[model]["preference_accuracy"] <= 1.0
        assert report[model]["kl_to_sft"] != 0.0
    assert json.loads((root / "metrics/eval.json").read_text())["judge"] == "heldout_rm"
