"""The demo data generator: determinism, formats, hold-out, and agreement with the oracle."""
from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path

import pytest

from rlhf_core.demo import data as demo_data
from rlhf_core.demo import oracle
from rlhf_core.demo.data import DemoDataConfig

SMALL = DemoDataConfig(
    seed=7, n_pt_docs=60, n_sft=200, n_preferences=200, n_prompts=60, n_eval_prompts=40
)
FILES = ("pt.txt", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
TRAINING_FILES = ("pt.txt", "sft.jsonl", "preferences.jsonl", "prompts.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _sft_pairs(out_dir: Path) -> list[tuple[str, str]]:
    """(prompt, response) of every SFT record."""
    pairs = []
    for record in _read_jsonl(out_dir / "sft.jsonl"):
        turns = [turn for turn in record["conversations"] if turn["from"] != "system"]
        pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo")
    demo_data.generate(out_dir, SMALL)
    return out_dir


def test_counts_match_config_and_files(tmp_path: Path) -> None:
    counts = demo_data.generate(tmp_path, SMALL)
    assert counts == {
        "pt.txt": 60,
        "sft.jsonl": 200,
        "preferences.jsonl": 200,
        "prompts.jsonl": 60,
        "eval_prompts.jsonl": 40,
    }
    for name, count in counts.items():
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert text.endswith("\n")
        assert len(text.splitlines()) == count


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    demo_data.generate(tmp_path / "a", SMALL)
    demo_data.generate(tmp_path / "b", SMALL)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    demo_data.generate(tmp_path / "a", SMALL)
    demo_data.generate(tmp_path / "b", DemoDataConfig(**{**vars(SMALL), "seed": 8}))
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_sft_records_are_sharegpt(small_dir: Path) -> None:
    for record in _read_jsonl(small_dir / "sft.jsonl"):
        assert set(record) == {"conversations"}
        turns = record["conversations"]
        assert all(set(turn) == {"from", "value"} for turn in turns)
        roles = [turn["from"] for turn in turns]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert all(isinstance(turn["value"], str) and turn["value"] for turn in turns)


def test_system_prompt_fraction_adds_a_leading_system_turn(tmp_path: Path) -> None:
    cfg = DemoDataConfig(**{**vars(SMALL), "system_prompt_fraction": 0.25})
    demo_data.generate(tmp_path, cfg)
    records = _read_jsonl(tmp_path / "sft.jsonl")
    with_system = [r for r in records if r["conversations"][0]["from"] == "system"]
    assert len(with_system) == 50
    for record in with_system:
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles == ["system", "human", "gpt"]


def test_preference_and_prompt_records_have_exact_keys(small_dir: Path) -> None:
    for record in _read_jsonl(small_dir / "preferences.jsonl"):
        assert set(record) == {"question", "response_chosen", "response_rejected"}
        assert all(isinstance(value, str) and value for value in record.values())
    for name in ("prompts.jsonl", "eval_prompts.jsonl"):
        for record in _read_jsonl(small_dir / name):
            assert set(record) == {"prompt"}
            assert oracle.country_of(record["prompt"]) is not None


def test_pt_documents_state_the_facts_and_contain_no_prompts(small_dir: Path) -> None:
    lines = (small_dir / "pt.txt").read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) > len(lines) // 2
    for line in lines:
        country = line.split()[0]
        assert country in oracle.KNOWLEDGE
        assert oracle.KNOWLEDGE[country] in line
        assert "?" not in line and "{" not in line


def test_eval_prompts_never_appear_in_training_files(small_dir: Path) -> None:
    eval_prompts = {r["prompt"] for r in _read_jsonl(small_dir / "eval_prompts.jsonl")}
    assert len(eval_prompts) == 30
    training_text = "\n".join(
        (small_dir / name).read_text(encoding="utf-8") for name in TRAINING_FILES
    )
    leaked = [prompt for prompt in eval_prompts if prompt in training_text]
    assert leaked == []


def test_every_country_is_in_eval_and_in_training(small_dir: Path) -> None:
    eval_countries = {
        oracle.country_of(r["prompt"]) for r in _read_jsonl(small_dir / "eval_prompts.jsonl")
    }
    train_prompts = {prompt for prompt, _ in _sft_pairs(small_dir)}
    assert eval_countries == set(oracle.KNOWLEDGE)
    assert {oracle.country_of(prompt) for prompt in train_prompts} == set(oracle.KNOWLEDGE)


def test_grid_split_holds_back_one_template_per_country() -> None:
    train, held = demo_data.split_grid(random.Random(0))
    assert len(held) == 30 and len(train) == 150
    assert sorted(country for country, _ in held) == sorted(oracle.KNOWLEDGE)
    assert not set(train) & set(held)
    per_template = [sum(t == template for _, t in held) for template in oracle.PROMPT_TEMPLATES]
    assert per_template == [5] * 6


def test_every_preference_pair_is_ordered_by_the_oracle(small_dir: Path) -> None:
    records = _read_jsonl(small_dir / "preferences.jsonl")
    chosen_scores = []
    for record in records:
        chosen = oracle.score(record["question"], record["response_chosen"])
        rejected = oracle.score(record["question"], record["response_rejected"])
        assert chosen > rejected, record
        chosen_scores.append(chosen)
    # mostly good-vs-flawed, some flawed-vs-worse
    assert 0.6 <= chosen_scores.count(1.0) / len(records) < 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
def test_flawed_fraction_of_sft_matches_config(tmp_path: Path, fraction: float) -> None:
    demo_data.generate(tmp_path, DemoDataConfig(**{**vars(SMALL), "flawed_fraction": fraction}))
    scores = [oracle.score(prompt, response) for prompt, response in _sft_pairs(tmp_path)]
    flawed = sum(s < 1.0 for s in scores) / len(scores)
    assert abs(flawed - fraction) <= 0.05


def test_good_sft_responses_are_perfect_and_flawed_ones_break_one_rule(small_dir: Path) -> None:
    kinds = set()
    for prompt, response in _sft_pairs(small_dir):
        parts = oracle.score_parts(prompt, response)
        broken = [name for name, value in parts.items() if value == 0.0]
        assert len(broken) <= 1, (response, broken)
        if not broken:
            assert oracle.score(prompt, response) == 1.0
        kinds.update(broken)
    assert kinds == {"correct", "polite", "brief"}


def test_all_good_when_nothing_is_flawed(tmp_path: Path) -> None:
    demo_data.generate(tmp_path, DemoDataConfig(**{**vars(SMALL), "flawed_fraction": 0.0}))
    assert all(oracle.score(p, r) == 1.0 for p, r in _sft_pairs(tmp_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("seed", 1.5),
        ("n_pt_docs", 0),
        ("n_sft", 0),
        ("n_preferences", -3),
        ("n_prompts", True),
        ("n_eval_prompts", 0),
        ("flawed_fraction", 1.5),
        ("flawed_fraction", -0.1),
        ("system_prompt_fraction", float("nan")),
    ],
)
def test_config_rejects_out_of_range_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DemoDataConfig(**{field: value})


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        DemoDataConfig().seed = 3  # type: ignore[misc]


def test_main_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_data.main([str(tmp_path / "out"), "--seed", "3", "--n-sft", "20"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["sft.jsonl"] == 20
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(FILES)


def test_main_reports_a_bad_value(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        demo_data.main([str(tmp_path), "--flawed-fraction", "2"])


def test_demo_data_imports_only_the_standard_library_and_oracle() -> None:
    tree = ast.parse(Path(demo_data.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    outside = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names and name != "rlhf_core.demo.oracle"
    }
    assert outside == set()


def test_rejected_answers_cover_the_failures_a_policy_can_hack(tmp_path: Path) -> None:
    """Truncated and garbled answers are rejected (so a reward model learns they are bad), and
    a wrong capital is drawn about three times as often as any other single flaw."""
    demo_data.generate(tmp_path, demo_data.DemoDataConfig(n_preferences=700, n_sft=10, n_pt_docs=5,
                                                         n_prompts=5, n_eval_prompts=5))
    rows = [json.loads(line) for line in (tmp_path / demo_data.PREFERENCES_FILE).read_text().splitlines()]
    capitals = set(oracle.KNOWLEDGE.values())

    def kind(question: str, answer: str) -> str:
        named = {w.strip(".!?,") for w in answer.split()} & capitals
        if oracle.KNOWLEDGE[oracle.country_of(question)] in named:
            return "right"
        if named:
            return "wrong"
        if "not sure" in answer or "do not know" in answer:
            return "unsure"
        return "cut" if answer.rstrip(".").endswith((" is", "capital of")) or "." not in answer[-1:] else "garbled"

    kinds = [kind(r["question"], r["response_rejected"]) for r in rows]
    assert kinds.count("cut") > 20 and kinds.count("garbled") > 20
    assert kinds.count("wrong") > 2 * kinds.count("cut")
