"""Who judges the evaluation: the oracle only on the demo data, a held-out reward model otherwise;
and the held-out judge split that feeds it."""
from __future__ import annotations

import pytest

from rlhf_core.config import TokenizeConfig
from rlhf_core.data.encoding import _group_split, split_indices
from rlhf_core.errors import ConfigError
from tasks.params import parse_params, resolve_judge

OWN_DATA = {"pt": "data/mine/pt.txt", "sft": "data/mine/sft.json", "preference": "data/mine/prefs.json",
            "prompts": "data/mine/prompts.jsonl", "eval_prompts": "data/mine/eval.jsonl"}


def test_demo_data_is_judged_by_the_oracle():
    assert resolve_judge(parse_params({})) == "oracle"


def test_own_data_defaults_to_the_heldout_rm_and_needs_a_judge_split():
    with pytest.raises(ConfigError, match=r"'tokenize.judge_fraction': must be > 0 .*heldout_rm"):
        parse_params({"data": OWN_DATA})
    p = parse_params({"data": OWN_DATA, "tokenize": {"judge_fraction": 0.2}})
    assert resolve_judge(p) == "heldout_rm"


def test_the_oracle_judges_whenever_the_questions_are_the_demos():
    """Own training files but the demo's held-out questions: the oracle still knows the answers."""
    p = parse_params({"data": {"sft": "data/mine/sft.json"}})
    assert resolve_judge(p) == "oracle"
    with pytest.raises(ConfigError, match="judge_fraction"):
        parse_params({"data": {"eval_prompts": "data/mine/eval.jsonl"}})


def test_the_oracle_is_refused_on_own_data():
    with pytest.raises(ConfigError, match=r"'evaluate.judge': 'oracle' only knows the demo task"):
        parse_params({"data": OWN_DATA, "evaluate": {"judge": "oracle"}})


def test_a_named_reward_model_is_the_judge_as_given():
    p = parse_params({"data": OWN_DATA, "evaluate": {"judge": "models:/team-judge@prod"}})
    assert resolve_judge(p) == "models:/team-judge@prod"


def test_judge_fraction_zero_splits_exactly_as_before():
    groups = [g for g in range(40) for _ in range(1 + g % 3)]  # rankings expand to several pairs
    split = _group_split(groups, TokenizeConfig(eval_fraction=0.1, seed=4))
    uniq = sorted(set(groups))
    _, ev = split_indices(len(uniq), 0.1, 4)
    assert set(split) == {"train", "eval"}
    assert {groups[i] for i in split["eval"]} == {uniq[i] for i in ev}


def test_judge_split_is_disjoint_by_record_and_covers_everything():
    groups = [g for g in range(50) for _ in range(1 + g % 3)]
    split = _group_split(groups, TokenizeConfig(eval_fraction=0.1, judge_fraction=0.2, seed=0))
    sides = {name: {groups[i] for i in idx} for name, idx in split.items()}
    assert sides["train"].isdisjoint(sides["judge"]) and sides["eval"].isdisjoint(sides["judge"])
    assert sides["train"].isdisjoint(sides["eval"])
    assert sorted(i for idx in split.values() for i in idx) == list(range(len(groups)))
    assert len(sides["judge"]) == 10 and len(sides["eval"]) == 4  # round(50 * 0.2), round(40 * 0.1)


def test_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="eval_fraction \\+ judge_fraction must be < 1"):
        TokenizeConfig(eval_fraction=0.5, judge_fraction=0.5)
