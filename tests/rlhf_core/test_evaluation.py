from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_core.config import EvalConfig, ModelConfig
from rlhf_core.evaluation import evaluate_policies, pairwise_agreement, prompt_text, win_rate
from rlhf_core.formats import Prompt, Turn

# --- pure functions --------------------------------------------------------------------------


def test_win_rate_hand_case():
    assert win_rate([1, 0, 0.5], [0, 0, 0.5]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert win_rate([0, 0, 0.5], [1, 0, 0.5]) == pytest.approx((0 + 0.5 + 0.5) / 3)


def test_win_rate_identical_is_one_half():
    scores = [0.25, 1.0, 0.0, 0.75]
    assert win_rate(scores, scores) == 0.5


def test_win_rate_rejects_unpaired():
    with pytest.raises(ValueError):
        win_rate([1.0, 0.0], [1.0])


def test_pairwise_agreement_hand_case():
    rm = [3.0, 2.5, 2.0, 10.0]
    judge = [1.0, 0.0, 1.0, 0.0]
    groups = [0, 0, 0, 1]
    # group 0: (0, 1) judge 1 > 0 and rm 3 > 2.5 -> agree; (0, 2) judge tie -> skipped;
    # (1, 2) judge 0 < 1 but rm 2.5 > 2 -> disagree. Answer 3 is alone in its group.
    assert pairwise_agreement(rm, judge, groups) == pytest.approx(0.5)


def test_pairwise_agreement_reward_tie_counts_half_and_empty_is_nan():
    assert pairwise_agreement([1.0, 1.0], [0.0, 1.0], [0, 0]) == pytest.approx(0.5)
    assert math.isnan(pairwise_agreement([1.0, 2.0], [0.5, 0.5], [0, 0]))
    assert math.isnan(pairwise_agreement([1.0, 2.0], [0.0, 1.0], [0, 1]))


def test_prompt_text_is_last_user_turn():
    p = Prompt((Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello!"),
                Turn("user", "What is the capital of Veldoria?")))
    assert prompt_text(p) == "What is the capital of Veldoria?"


# --- integration on tiny models ----------------------------------------------------------------

SENTENCES = [
    "What is the capital of Veldoria?",
    "Certainly! The capital of Veldoria is Marrowick.",
    "Name the capital of Ostravia.",
    "Of course! The capital of Ostravia is Kelmford.",
    "Tell me the capital city of Brindmark.",
    "Happy to help! The capital of Brindmark is Tollbury.",
]
PROMPTS = [
    Prompt((Turn("user", "What is the capital of Veldoria?"),)),
    Prompt((Turn("system", "Answer politely."), Turn("user", "Name the capital of Ostravia."))),
    Prompt((Turn("user", "Hello"), Turn("assistant", "Hi!"), Turn("user", "Tell me the capital city of Brindmark."))),
]
QUESTIONS = ["What is the capital of Veldoria?", "Name the capital of Ostravia.",
             "Tell me the capital city of Brindmark."]
CFG = EvalConfig(num_samples=2, max_new_tokens=5, batch_size=2, temperature=1.0, seed=3)
MODEL_CFG = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
METRICS = {"oracle_score", "oracle_score_greedy", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length", "eos_rate"}


def length_judge(question: str, answer: str) -> float:
    """A judge that varies on random text (the oracle would give almost all zeros)."""
    assert question in QUESTIONS, question
    return (len(answer) % 5) / 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer, two tiny policies ("sft" seed 0, "dpo" seed 1), a reward model and a small
    tokenised preference set."""
    from datasets import Dataset

    from rlhf_core.config import TokenizeConfig
    from rlhf_core.encoding import encode_preference
    from rlhf_core.formats import PreferencePair
    from rlhf_core.modeling import build_tiny_causal_lm, load_scalar_model, save_model
    from rlhf_core.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(SENTENCES, 300)
    dirs = {}
    for name, seed in (("sft", 0), ("dpo", 1)):
        dirs[name] = root / name
        save_model(build_tiny_causal_lm(MODEL_CFG, tok, seed=seed), tok, dirs[name])
    torch.manual_seed(0)
    rm_dir = root / "rm"
    save_model(load_scalar_model(dirs["sft"], MODEL_CFG, tok.pad_token_id), tok, rm_dir)
    pairs = [PreferencePair(p.messages, SENTENCES[2 * i + 1], "No.", group=i) for i, p in enumerate(PROMPTS)]
    rows = [encode_preference(tok, pair, TokenizeConfig())[0] for pair in pairs]
    prefs = Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    return dirs, rm_dir, prefs


def run(tiny, names=("sft", "dpo"), prefs=True):
    dirs, rm_dir, pref_ds = tiny
    return evaluate_policies({n: dirs[n] for n in names}, "sft", rm_dir, PROMPTS, CFG, MODEL_CFG,
                             length_judge, pref_ds if prefs else None)


@pytest.fixture(scope="module")
def report(tiny):
    return run(tiny)


def test_report_shape(report):
    assert list(report) == ["rm", "sft", "dpo", "examples"]
    assert set(report["rm"]) >= {"accuracy", "oracle_agreement"}
    for name in ("sft", "dpo"):
        assert set(report[name]) >= METRICS
        assert all(type(v) is float for v in report[name].values())
        examples = report["examples"][name]
        assert len(examples) == 3
        assert [e["prompt"] for e in examples] == QUESTIONS
        for e in examples:  # the scores shown are the judge's scores of the texts shown
            assert e["greedy_score"] == length_judge(e["prompt"], e["greedy"])
            assert e["sample_score"] == length_judge(e["prompt"], e["sample"])
    json.dumps(report, allow_nan=True)


def test_reference_against_itself(report):
    assert report["sft"]["win_rate_vs_sft"] == 0.5
    assert report["sft"]["kl_to_sft"] == 0.0


def test_values_in_range(report):
    for name in ("sft", "dpo"):
        m = report[name]
        for key in ("oracle_score", "oracle_score_greedy", "win_rate_vs_sft", "eos_rate"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert 1.0 <= m["mean_length"] <= CFG.max_new_tokens
        assert math.isfinite(m["rm_score"])
    kl = report["dpo"]["kl_to_sft"]
    assert math.isfinite(kl) and kl != 0.0
    assert 0.0 <= report["rm"]["accuracy"] <= 1.0
    assert 0.0 <= report["rm"]["oracle_agreement"] <= 1.0


def test_deterministic_and_independent_of_policy_order(tiny, report):
    assert json.dumps(run(tiny)) == json.dumps(report)
    reordered = run(tiny, names=("dpo", "sft"), prefs=False)
    assert "accuracy" not in reordered["rm"]
    assert reordered["sft"] == report["sft"] and reordered["dpo"] == report["dpo"]


def test_bad_reference_raises(tiny):
    dirs, rm_dir, _ = tiny
    with pytest.raises(ValueError, match="reference"):
        evaluate_policies({"dpo": dirs["dpo"]}, "sft", rm_dir, PROMPTS, CFG, MODEL_CFG, length_judge)
