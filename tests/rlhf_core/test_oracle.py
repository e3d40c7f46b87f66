"""The oracle's rule, checked on hand-written answers whose scores are worked out by hand."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from rlhf_core.demo import oracle

PROMPT = "What is the capital of Veldoria?"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # polite, correct, brief
        ("Certainly! The capital of Veldoria is Marrowick.", 1.0),
        ("Happy to help! The capital of Veldoria is Marrowick.", 1.0),
        # correct and brief, but rude: no opener, or a curt one
        ("The capital of Veldoria is Marrowick.", 0.75),
        ("Ugh, fine. The capital of Veldoria is Marrowick.", 0.75),
        ("certainly! The capital of Veldoria is Marrowick.", 0.75),
        # polite and brief, but the capital of another country
        ("Of course! The capital of Veldoria is Kelmford.", 0.5),
        # polite and brief, but no answer at all
        ("Sure thing! I am not sure about that.", 0.5),
        # correct and polite, but rambling past 12 words
        (
            "Certainly! The capital of Veldoria is Marrowick. It is a lovely place to visit.",
            0.75,
        ),
        # names its capital and another one: not correct
        ("Certainly! The capital of Veldoria is Marrowick or Kelmford.", 0.5),
        # a possessive is not the name itself
        ("Certainly! Marrowick's the one.", 0.5),
        # nothing, or only punctuation
        ("", 0.0),
        ("   ", 0.0),
        ("!!!", 0.0),
        # degenerate loops
        ("The capital of Veldoria The capital of Veldoria The capital of Veldoria", 0.0),
        ("Marrowick Marrowick", 0.5),
        ("Certainly! Marrowick Marrowick", 0.75),
        # 12 words, so short enough, but the sentence is repeated
        ("The capital of Veldoria is Marrowick. The capital of Veldoria is Marrowick.", 0.5),
        (
            "Certainly! The capital of Veldoria is Marrowick. "
            "The capital of Veldoria is Marrowick.",
            0.75,
        ),
        # rude, wrong and rambling at once
        (
            "Whatever. The capital of Veldoria is Kelmford. It is a lovely place to visit.",
            0.0,
        ),
    ],
)
def test_score_of_hand_written_answers(response: str, expected: float) -> None:
    assert oracle.score(PROMPT, response) == expected


def test_score_parts_name_the_broken_rule() -> None:
    rude = oracle.score_parts(PROMPT, "The capital of Veldoria is Marrowick.")
    wrong = oracle.score_parts(PROMPT, "Certainly! The capital of Veldoria is Kelmford.")
    long = oracle.score_parts(
        PROMPT, "Certainly! The capital of Veldoria is Marrowick. It is a lovely place to visit."
    )
    assert rude == {"correct": 1.0, "polite": 0.0, "brief": 1.0}
    assert wrong == {"correct": 0.0, "polite": 1.0, "brief": 1.0}
    assert long == {"correct": 1.0, "polite": 1.0, "brief": 0.0}
    assert oracle.score_parts(PROMPT, "") == {"correct": 0.0, "polite": 0.0, "brief": 0.0}


def test_unknown_country_cannot_be_answered_correctly() -> None:
    prompt = "What is the capital of Atlantis?"
    assert oracle.country_of(prompt) is None
    assert oracle.score_parts(prompt, "Certainly! The capital of Atlantis is Marrowick.") == {
        "correct": 0.0,
        "polite": 1.0,
        "brief": 1.0,
    }
    assert oracle.score(prompt, "Certainly! The capital of Atlantis is Marrowick.") == 0.5


def test_word_limit_is_twelve() -> None:
    twelve = "Certainly! The capital of Veldoria is Marrowick, a fine old harbour town."
    thirteen = "Certainly! The capital of Veldoria is Marrowick, a fine old harbour town today."
    assert len(oracle.words(twelve)) == 12
    assert oracle.score(PROMPT, twelve) == 1.0
    assert oracle.score(PROMPT, thirteen) == 0.75


def test_country_of_finds_the_country_in_every_template() -> None:
    for country in oracle.KNOWLEDGE:
        for template in oracle.PROMPT_TEMPLATES:
            assert oracle.country_of(template.format(country=country)) == country
    assert oracle.country_of("capital of veldoria please") == "Veldoria"
    assert oracle.country_of("Tell me about Veldorian food.") is None


def test_every_good_answer_scores_one_and_no_other_capital_does() -> None:
    for country, capital in oracle.KNOWLEDGE.items():
        prompt = oracle.PROMPT_TEMPLATES[0].format(country=country)
        for opener in oracle.POLITE_OPENERS:
            good = f"{opener} " + oracle.ANSWER_TEMPLATE.format(country=country, capital=capital)
            assert oracle.score(prompt, good) == 1.0
        for other in oracle.KNOWLEDGE.values():
            if other != capital:
                answer = oracle.ANSWER_TEMPLATE.format(country=country, capital=other)
                wrong = "Certainly! " + answer
                assert oracle.score(prompt, wrong) == 0.5


def test_knowledge_table_names_are_distinct_single_words_and_prefix_free() -> None:
    names = [name.lower() for name in [*oracle.KNOWLEDGE, *oracle.KNOWLEDGE.values()]]
    assert len(oracle.KNOWLEDGE) == 30
    assert len(set(names)) == len(names)
    assert all(name.isalpha() for name in names)
    assert not [(a, b) for a in names for b in names if a != b and b.startswith(a)]


def test_vocabulary_sizes_and_weights() -> None:
    assert len(oracle.PROMPT_TEMPLATES) == 6
    assert all("{country}" in template for template in oracle.PROMPT_TEMPLATES)
    assert len(oracle.POLITE_OPENERS) == 4
    assert sum(oracle.WEIGHTS.values()) == 1.0


def test_score_is_deterministic_and_gives_the_hand_derived_values() -> None:
    cases = {
        "": 0.0,  # no word: not brief, not polite, names no capital
        "Certainly!": 0.5,  # polite 0.25 + brief 0.25 (one word), no capital
        "Marrowick": 0.75,  # correct 0.5 + brief 0.25, no opener
        "The capital of Veldoria is Marrowick. " * 5: 0.5,  # correct, but 30 words and repeated: not brief
    }
    for response, expected in cases.items():
        first = oracle.score(PROMPT, response)
        assert first == oracle.score(PROMPT, response)
        assert first == expected, response


def test_oracle_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(oracle.__file__).read_text(encoding="utf-8"))
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= set(sys.stdlib_module_names)
