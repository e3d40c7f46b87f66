from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_core.config import EvalConfig, ModelConfig
from rlhf_core.data.formats import Prompt, Turn
from rlhf_core.evaluation.evaluate import (
    RolloutRMJudge,
    TextJudge,
    TextRMJudge,
    evaluate_policies,
    load_judge,
    pairwise_agreement,
    prompt_text,
    win_rate,
    win_rate_rows,
)

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
METRICS = {"judge_score", "judge_score_greedy", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length", "eos_rate",
           "preference_accuracy"}


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
    from rlhf_core.data.encoding import encode_preference
    from rlhf_core.data.formats import PreferencePair
    from rlhf_core.data.tokenizer import train_tokenizer
    from rlhf_core.training.modeling import build_tiny_causal_lm, load_scalar_model, save_model

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


def run(tiny, names=("sft", "dpo"), prefs=True, judge=TextJudge("length", length_judge)):
    dirs, rm_dir, pref_ds = tiny
    return evaluate_policies({n: dirs[n] for n in names}, "sft", rm_dir, PROMPTS, CFG, MODEL_CFG,
                             judge, pref_ds if prefs else None)


@pytest.fixture(scope="module")
def report(tiny):
    return run(tiny)


def test_report_shape(report):
    assert list(report) == ["judge", "rm", "sft", "dpo", "examples"]
    assert report["judge"] == "length"
    assert set(report["rm"]) >= {"accuracy", "judge_agreement"}
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
        for key in ("judge_score", "judge_score_greedy", "win_rate_vs_sft", "eos_rate", "preference_accuracy"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert 1.0 <= m["mean_length"] <= CFG.max_new_tokens
        assert math.isfinite(m["rm_score"])
    kl = report["dpo"]["kl_to_sft"]
    assert math.isfinite(kl) and kl != 0.0
    assert 0.0 <= report["rm"]["accuracy"] <= 1.0
    assert 0.0 <= report["rm"]["judge_agreement"] <= 1.0


def test_deterministic_and_independent_of_policy_order(tiny, report):
    assert json.dumps(run(tiny)) == json.dumps(report)
    reordered = run(tiny, names=("dpo", "sft"), prefs=False)
    assert "accuracy" not in reordered["rm"]
    for name in ("sft", "dpo"):
        assert "preference_accuracy" not in reordered[name]
        assert reordered[name] == {k: v for k, v in report[name].items() if k != "preference_accuracy"}


def test_bad_reference_raises(tiny):
    dirs, rm_dir, _ = tiny
    with pytest.raises(ValueError, match="reference"):
        evaluate_policies({"dpo": dirs["dpo"]}, "sft", rm_dir, PROMPTS, CFG, MODEL_CFG, TextJudge("l", length_judge))


# --- judges and held-out preference accuracy ---------------------------------------------------

def test_win_rate_rows_hand_case():
    assert win_rate_rows(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 0.0])).tolist() == [1.0, 0.5, 0.0]


def test_preference_accuracy_of_the_reference_is_one_half_and_matches_a_naive_count(tiny, report):
    from rlhf_core.data.batching import collate_pairs
    from rlhf_core.stages.dpo import pair_logprobs
    from rlhf_core.training.modeling import load_policy

    assert report["sft"]["preference_accuracy"] == 0.5  # every log-ratio is exactly 0: all ties
    dirs, _, prefs = tiny
    sft, dpo = (load_policy(dirs[n], MODEL_CFG).eval() for n in ("sft", "dpo"))
    wins = 0.0
    for i in range(len(prefs)):  # one row at a time, no padding: the straightforward computation
        batch = collate_pairs(prefs[i:i + 1], 1)
        with torch.no_grad():
            pc, pr, _ = pair_logprobs(dpo, batch, "cpu")
            rc, rr, _ = pair_logprobs(sft, batch, "cpu")
        margin = float((pc - rc) - (pr - rr))
        wins += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    assert report["dpo"]["preference_accuracy"] == pytest.approx(wins / len(prefs))


def test_heldout_rm_judge_scores_the_sampled_tokens_like_the_policy_rm(tiny):
    """With the policy RM itself as the judge, judge scores are the RM scores, answer by answer."""
    from rlhf_core.data.tokenizer import load_tokenizer

    dirs, rm_dir, _ = tiny
    judge = load_judge(rm_dir, load_tokenizer(dirs["sft"]), MODEL_CFG, "cpu")
    assert isinstance(judge, RolloutRMJudge)
    report = run(tiny, prefs=False, judge=judge)
    assert report["judge"] == str(rm_dir)
    for name in ("sft", "dpo"):
        assert report[name]["judge_score"] == pytest.approx(report[name]["rm_score"], abs=1e-5)
    assert report["rm"]["judge_agreement"] == 1.0  # the same scores order every pair the same way


def test_a_judge_with_its_own_tokenizer_rerenders_the_answers(tiny, tmp_path):
    from rlhf_core.data.batching import collate_prompts
    from rlhf_core.data.encoding import render_ids
    from rlhf_core.data.tokenizer import load_tokenizer, train_tokenizer
    from rlhf_core.evaluation.evaluate import Answers
    from rlhf_core.ops.logprobs import gather_last
    from rlhf_core.training.modeling import build_tiny_causal_lm, load_scalar_model, save_model, token_scores

    dirs, _, _ = tiny
    own = train_tokenizer(["A different corpus entirely, for another vocabulary."] * 5 + SENTENCES[::2], 280)
    save_model(build_tiny_causal_lm(MODEL_CFG, own, seed=5), own, tmp_path / "lm")
    torch.manual_seed(1)
    save_model(load_scalar_model(tmp_path / "lm", MODEL_CFG, own.pad_token_id), own, tmp_path / "judge")
    judge = load_judge(tmp_path / "judge", load_tokenizer(dirs["sft"]), MODEL_CFG, "cpu")
    assert isinstance(judge, TextRMJudge) and judge.name == str(tmp_path / "judge")
    named = load_judge(tmp_path / "judge", load_tokenizer(dirs["sft"]), MODEL_CFG, "cpu", name="models:/team-judge@prod")
    assert named.name == "models:/team-judge@prod"  # the report names what the user gave, not a download folder
    texts = ["Marrowick.", "I do not know", "Kelmford!", "x"]
    scores = judge(PROMPTS[:2], Answers(texts, []), 2)
    assert scores.shape == (4,)
    ids = render_ids(own, (*PROMPTS[1].messages, Turn("assistant", texts[3])))  # answer 3 answers prompt 1
    batch = collate_prompts({"prompt_ids": [ids]}, own.pad_token_id)
    with torch.no_grad():
        alone = gather_last(token_scores(judge.model, batch.input_ids, batch.attention_mask), batch.attention_mask)
    assert float(scores[3]) == pytest.approx(float(alone[0]), abs=1e-5)


def test_bf16_evaluation_runs_under_autocast_and_keeps_the_reference_identities(tiny, report):
    import dataclasses

    dirs, rm_dir, prefs = tiny
    cfg = dataclasses.replace(CFG, mixed_precision="bf16")
    bf16 = evaluate_policies({n: dirs[n] for n in ("sft", "dpo")}, "sft", rm_dir, PROMPTS, cfg, MODEL_CFG,
                             TextJudge("length", length_judge), prefs)
    assert bf16["sft"]["kl_to_sft"] == 0.0 and bf16["sft"]["preference_accuracy"] == 0.5
    # reward-model scores carry bf16 rounding: the forwards really ran in low precision
    assert bf16["sft"]["rm_score"] != report["sft"]["rm_score"]
    assert bf16["sft"]["rm_score"] == pytest.approx(report["sft"]["rm_score"], abs=0.05)


def test_reference_log_probs_scored_once_give_the_same_preference_accuracy(tiny):
    """The evaluation scores the reference's held-out pairs once for every policy: the same
    accuracy as scoring them again, per policy, and a different policy really differs from 0.5."""
    from rlhf_core.evaluation.evaluate import logprob_table, preference_accuracy
    from rlhf_core.training.modeling import load_policy

    dirs, _, prefs = tiny
    sft, dpo = (load_policy(dirs[n], MODEL_CFG).eval() for n in ("sft", "dpo"))
    table = logprob_table(sft, prefs, 1, 3, "cpu")
    assert table.shape == (len(prefs), 2) and not table.isnan().any()
    fresh = preference_accuracy(dpo, sft, prefs, 1, 3, "cpu")
    assert preference_accuracy(dpo, sft, prefs, 1, 3, "cpu", table) == fresh != 0.5
    assert preference_accuracy(sft, sft, prefs, 1, 3, "cpu", table) == 0.5
