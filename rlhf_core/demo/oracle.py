"""The rule that says how good an answer to a demo question is.

The demo task is a made-up atlas: thirty invented countries, each with an invented
capital (`KNOWLEDGE`). A user asks for a capital with one of a few phrasings
(`PROMPT_TEMPLATES`); a good assistant answers politely, correctly and briefly, e.g.
"Certainly! The capital of Veldoria is Marrowick."

`score(prompt, response)` is a weighted sum of three pass/fail criteria, so it always
lies in [0, 1] and only takes the values 0, 0.25, 0.5, 0.75 and 1:

* correct (weight 0.5): the prompt names a country of the table, the response contains
  that country's capital as a word, and it contains no other capital of the table.
  A prompt that names no known country can never be answered correctly (0).
* polite (weight 0.25): the response, after leading whitespace, starts with one of the
  `POLITE_OPENERS`, spelled exactly.
* brief (weight 0.25): the response has at least one word and at most `MAX_WORDS` words,
  and no word-level repetition: no sentence occurs twice, no sequence of three words
  occurs twice, and no word directly follows itself.

Words are runs of letters and digits (an inner apostrophe, as in "don't", stays part of
the word); comparisons ignore case. Names are matched as whole words, so "Marrowick's"
does not count as naming Marrowick. The country of a prompt is the first table country
it names. The rule uses no randomness and no state: the same inputs give the same score.
"""
from __future__ import annotations

import re

KNOWLEDGE: dict[str, str] = {
    "Veldoria": "Marrowick",
    "Ostravia": "Kelmford",
    "Brindmark": "Tollbury",
    "Zanthera": "Quillon",
    "Morvane": "Dunmere",
    "Calypra": "Fennick",
    "Drovinia": "Halvenport",
    "Elsmoria": "Corvello",
    "Fandrel": "Lumeth",
    "Gorvania": "Pellbrook",
    "Hestavia": "Rovendale",
    "Istrane": "Sablecrest",
    "Jorvalia": "Tamsford",
    "Kaldoria": "Ulvenhold",
    "Lunmark": "Wexhollow",
    "Mirevia": "Yarrowmere",
    "Norvath": "Zelwick",
    "Orendal": "Arbelund",
    "Pallandra": "Bexmoor",
    "Quorvia": "Caldreth",
    "Rastovia": "Dravenholm",
    "Sorelia": "Elvarro",
    "Tarvessa": "Frostmere",
    "Umbravia": "Gallowind",
    "Vantoria": "Hollinmar",
    "Wystera": "Ivenmoor",
    "Xandril": "Jasperholt",
    "Yelvania": "Korrindale",
    "Zorvenia": "Lorvick",
    "Amberlune": "Mistrelle",
}
"""Invented country -> its invented capital; every name is one word, and no name is a
prefix of another."""

PROMPT_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {country}?",
    "Tell me the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
    "Do you know the capital of {country}?",
    "I need the capital of {country}.",
)
"""The ways a user asks; `{country}` is replaced by a country of `KNOWLEDGE`."""

POLITE_OPENERS: tuple[str, ...] = ("Certainly!", "Of course!", "Happy to help!", "Sure thing!")
"""A polite response starts with exactly one of these."""

ANSWER_TEMPLATE = "The capital of {country} is {capital}."
"""The one sentence shape of a correct answer."""

WEIGHTS: dict[str, float] = {"correct": 0.5, "polite": 0.25, "brief": 0.25}
"""Weight of each criterion in `score`; they sum to 1."""

MAX_WORDS = 12
"""A brief response has at most this many words."""

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CAPITAL_OF = {country.lower(): capital.lower() for country, capital in KNOWLEDGE.items()}
_COUNTRY_NAME = {country.lower(): country for country in KNOWLEDGE}
_ALL_CAPITALS = frozenset(_CAPITAL_OF.values())


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order (punctuation dropped)."""
    return [word.lower() for word in _WORD.findall(text)]


def country_of(prompt: str) -> str | None:
    """The first country of `KNOWLEDGE` named in `prompt`, or None if it names none."""
    for word in words(prompt):
        if word in _COUNTRY_NAME:
            return _COUNTRY_NAME[word]
    return None


def is_correct(prompt: str, response: str) -> bool:
    """True if `response` names the capital asked for and no other capital."""
    country = country_of(prompt)
    if country is None:
        return False
    named = _ALL_CAPITALS.intersection(words(response))
    return named == {_CAPITAL_OF[country.lower()]}


def is_polite(response: str) -> bool:
    """True if `response` starts with one of `POLITE_OPENERS`."""
    return response.lstrip().startswith(POLITE_OPENERS)


def has_repetition(response: str) -> bool:
    """True if a sentence, a three-word sequence or a word back to back occurs twice."""
    tokens = words(response)
    if any(left == right for left, right in zip(tokens, tokens[1:])):
        return True
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    if len(set(trigrams)) < len(trigrams):
        return True
    sentences = [" ".join(words(part)) for part in _SENTENCE_END.split(response.strip())]
    sentences = [sentence for sentence in sentences if sentence]
    return len(set(sentences)) < len(sentences)


def is_brief(response: str) -> bool:
    """True if `response` has 1 to `MAX_WORDS` words and no repetition."""
    count = len(words(response))
    return 0 < count <= MAX_WORDS and not has_repetition(response)


def score_parts(prompt: str, response: str) -> dict[str, float]:
    """Each criterion of `score`, as 1.0 (met) or 0.0 (not met), before weighting."""
    return {
        "correct": float(is_correct(prompt, response)),
        "polite": float(is_polite(response)),
        "brief": float(is_brief(response)),
    }


def score(prompt: str, response: str) -> float:
    """How good `response` is as an answer to `prompt`, in [0, 1] (see module docstring)."""
    parts = score_parts(prompt, response)
    return sum(WEIGHTS[name] * value for name, value in parts.items())
