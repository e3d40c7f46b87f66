"""Writes the synthetic data set of the demo: a made-up atlas a tiny model can learn on a CPU.

The facts and the quality rule live in `rlhf_core.demo.oracle`. This module turns them into the
five files the pipeline reads (see `generate`):

* pt.txt              encyclopedia documents, one per line, for continued pretraining;
* sft.jsonl           ShareGPT conversations, a share of them deliberately flawed;
* preferences.jsonl   question, chosen and rejected answer, chosen always scores higher;
* prompts.jsonl       questions for PPO;
* eval_prompts.jsonl  held-out questions: their (country, phrasing) pairs occur in no
                      training file.

The hold-out works on the grid of 30 countries x 6 phrasings: each country keeps exactly one
phrasing back for evaluation (each phrasing is kept back for the same number of countries),
and the training files only ever use the other cells. A flawed response breaks exactly one
rule of the oracle: rude (no opener or a curt one), wrong (another country's capital),
rambling (correct, then filler sentences past the word limit) or no answer.

All randomness comes from one `random.Random(cfg.seed)`, which seeds one child generator
per file, so the same config writes byte-identical files and changing one count leaves the
other files unchanged. Run it as `python -m rlhf_core.demo.data OUT_DIR [--seed N]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from rlhf_core.demo import oracle

PT_FILE = "pt.txt"
SFT_FILE = "sft.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
PROMPTS_FILE = "prompts.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"

CURT_OPENERS: tuple[str, ...] = ("Obviously.", "Ugh, fine.", "Whatever.")
"""Openers of a rude response; none of them is polite to the oracle."""

UNSURE_REPLIES: tuple[str, ...] = ("I am not sure about that.", "I do not know that one.")
"""What a response that gives no answer says instead."""

CUT_ANSWERS: tuple[str, ...] = ("The capital of {country} is", "The capital of {country}.", "The capital of.")
"""Answers that stop before naming the capital."""
GARBLED_ANSWERS: tuple[str, ...] = ("The capital of {country} is {mangled}.", "The capital of{mangled}.")
"""Answers whose capital lost its first letters (`mangled`)."""
FILLERS: tuple[str, ...] = (
    "It is a lovely place to visit.",
    "Many people travel there every year.",
    "The weather there is often mild.",
    "I hope this answer helps you today.",
    "Let me know if you need anything else.",
    "There is a lot more to say about it.",
)
"""Sentences a rambling response adds; each has at least four words, so two of them push
even the shortest answer past the oracle's word limit."""

SYSTEM_PROMPT = "You are a helpful assistant. Answer politely, correctly and briefly."
"""The system turn put in front of a `system_prompt_fraction` of the SFT conversations."""

SFT_FLAWS: tuple[str, ...] = ("rude", "wrong", "no_answer", "rambling")
"""The ways a flawed SFT response goes wrong; each breaks exactly one oracle rule."""

PREFERENCE_FLAWS: tuple[str, ...] = SFT_FLAWS + ("repetitive", "truncated", "garbled")
"""Rejected answers may also show the failures a sampled policy falls into and a reward model
must not reward: repeating the answer, stopping before the capital, or mangling its name."""

REJECTED_FLAW_WEIGHTS: dict[str, int] = {flaw: 1 for flaw in PREFERENCE_FLAWS} | {"wrong": 3}
"""How often each flaw is drawn for a rejected answer. A wrong capital is the hardest flaw for a
reward model to see (it must know the fact), so it gets more examples."""
WORSE_PAIR_FRACTION = 0.25
"""Share of preference pairs that oppose a flawed answer to a worse one (the rest oppose a
good answer to a flawed one)."""

ADJECTIVES: tuple[str, ...] = ("quiet", "small", "green", "busy", "proud", "sunny")
SETTINGS: tuple[str, ...] = (
    "by the sea",
    "in the mountains",
    "on a wide plain",
    "near a great river",
    "among low hills",
    "on a large island",
)
LANDMARKS: tuple[str, ...] = (
    "old bridges",
    "busy markets",
    "tall towers",
    "quiet gardens",
    "great library",
    "stone harbour",
)

INTRO_SENTENCE = "{country} is a {adjective} country {setting}."
FIRST_FACT_SENTENCES: tuple[str, ...] = (
    "Its capital city is {capital}.",
    "Its capital is {capital}.",
    "The capital of {country} is {capital}.",
)
MORE_FACT_SENTENCES: tuple[str, ...] = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
    "The government of {country} meets in {capital}.",
    "{capital} is the largest city in {country}.",
)
DETAIL_SENTENCES: tuple[str, ...] = (
    "{capital} is known for its {landmark}.",
    "Visitors to {country} often begin their trip in {capital}.",
    "The people of {country} are proud of {capital}.",
    "Life in {country} is calm and friendly.",
)

Cell = tuple[str, str]
"""One (country, prompt template) square of the question grid."""


@dataclass(frozen=True)
class DemoDataConfig:
    """How much demo data to write, and how it is mixed."""

    seed: int = 0
    """Seed of the single random generator; the same seed gives byte-identical files."""
    n_pt_docs: int = 600
    """Number of encyclopedia documents (lines) in pt.txt."""
    n_sft: int = 1200
    """Number of conversations in sft.jsonl."""
    n_preferences: int = 1200
    """Number of (chosen, rejected) pairs in preferences.jsonl."""
    n_prompts: int = 400
    """Number of PPO prompts in prompts.jsonl."""
    n_eval_prompts: int = 60
    """Number of held-out prompts in eval_prompts.jsonl (the 30 held-out cells, cycled)."""
    flawed_fraction: float = 0.6
    """Share of SFT responses that break one oracle rule, in [0, 1]; rounded to a count."""
    system_prompt_fraction: float = 0.0
    """Share of SFT conversations that open with a system turn, in [0, 1]."""

    def __post_init__(self) -> None:
        """Reject values out of range, naming the field."""
        _check_int("seed", self.seed, minimum=0)
        for name in ("n_pt_docs", "n_sft", "n_preferences", "n_prompts", "n_eval_prompts"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("flawed_fraction", "system_prompt_fraction"):
            _check_fraction(name, getattr(self, name))


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless `value` is an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_fraction(name: str, value: object) -> None:
    """Raise ValueError unless `value` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class Plan:
    """What a response does about each oracle rule; the defaults make a perfect answer."""

    manner: str = "polite"
    """One of "polite" (polite opener), "curt" (rude opener) or "bare" (no opener)."""
    content: str = "right"
    """One of "right" (its capital), "wrong" (another capital), "unsure" (no answer), "cut"
    (the sentence stops before the capital) or "garbled" (the capital loses its first letters)."""
    length: str = "brief"
    """One of "brief" (one sentence), "ramble" (plus fillers) or "repeat" (said 2-3 times)."""


GOOD = Plan()
_BAD_VALUES: dict[str, tuple[str, ...]] = {
    "manner": ("curt", "bare"),
    "content": ("wrong", "unsure", "cut", "garbled"),
    "length": ("ramble", "repeat"),
}


def flaw_plan(flaw: str, rng: random.Random) -> Plan:
    """The plan of a response that breaks exactly the one rule named by `flaw`."""
    if flaw == "rude":
        return dataclasses.replace(GOOD, manner=rng.choice(_BAD_VALUES["manner"]))
    changes = {
        "wrong": {"content": "wrong"},
        "no_answer": {"content": "unsure"},
        "rambling": {"length": "ramble"},
        "repetitive": {"length": "repeat"},
        "truncated": {"content": "cut"},
        "garbled": {"content": "garbled"},
    }
    if flaw not in changes:
        raise ValueError(f"unknown flaw {flaw!r}; expected one of {PREFERENCE_FLAWS}")
    return dataclasses.replace(GOOD, **changes[flaw])


def worsen(plan: Plan, rng: random.Random) -> Plan:
    """`plan` with one more rule broken, chosen among the rules it still keeps."""
    kept = [name for name in _BAD_VALUES if getattr(plan, name) == getattr(GOOD, name)]
    if not kept:
        raise ValueError(f"{plan} already breaks every rule")
    name = rng.choice(kept)
    return dataclasses.replace(plan, **{name: rng.choice(_BAD_VALUES[name])})


def render(plan: Plan, country: str, rng: random.Random) -> str:
    """Write the response to a question about `country` that follows `plan`."""
    if plan.content == "right":
        core = oracle.ANSWER_TEMPLATE.format(country=country, capital=oracle.KNOWLEDGE[country])
    elif plan.content == "wrong":
        others = sorted(c for name, c in oracle.KNOWLEDGE.items() if name != country)
        core = oracle.ANSWER_TEMPLATE.format(country=country, capital=rng.choice(others))
    elif plan.content == "cut":
        core = rng.choice(CUT_ANSWERS).format(country=country)
    elif plan.content == "garbled":
        mangled = oracle.KNOWLEDGE[country][rng.randint(1, 3):]
        core = rng.choice(GARBLED_ANSWERS).format(country=country, mangled=mangled)
    else:
        core = rng.choice(UNSURE_REPLIES)
    if plan.length == "ramble":
        body = [core, *rng.sample(FILLERS, rng.randint(2, 4))]
    elif plan.length == "repeat":
        body = [core] * rng.randint(2, 3)
    else:
        body = [core]
    openers = {"polite": oracle.POLITE_OPENERS, "curt": CURT_OPENERS, "bare": ()}[plan.manner]
    opener = [rng.choice(openers)] if openers else []
    return " ".join(opener + body)


def split_grid(rng: random.Random) -> tuple[list[Cell], list[Cell]]:
    """Split the country x template grid into (training cells, evaluation cells).

    Every country holds back exactly one template for evaluation, and every template is
    held back for the same number of countries (give or take one).
    """
    countries = sorted(oracle.KNOWLEDGE)
    templates = oracle.PROMPT_TEMPLATES
    held_back = [i % len(templates) for i in range(len(countries))]
    rng.shuffle(held_back)
    eval_cells = [(country, templates[i]) for country, i in zip(countries, held_back)]
    train_cells = [
        (country, template)
        for country, i in zip(countries, held_back)
        for template in templates
        if template != templates[i]
    ]
    return train_cells, eval_cells


def ask(cell: Cell) -> str:
    """The question of one grid cell."""
    country, template = cell
    return template.format(country=country)


def _deal(items: Sequence, rng: random.Random) -> Iterator:
    """Yield `items` forever, each pass in a fresh random order, so every item is used evenly."""
    while True:
        deck = list(items)
        rng.shuffle(deck)
        yield from deck


def _draw(items: Sequence, count: int, rng: random.Random) -> list:
    """`count` items dealt from `items` in balanced random passes."""
    return list(itertools.islice(_deal(items, rng), count))


def _exact_flags(share: float, count: int, rng: random.Random) -> list[bool]:
    """`count` booleans in random order, round(share * count) of them True."""
    n_true = round(share * count)
    flags = [True] * n_true + [False] * (count - n_true)
    rng.shuffle(flags)
    return flags


def _require(condition: bool, message: str) -> None:
    """Stop generation if the data contradicts the oracle (a bug in this module)."""
    if not condition:
        raise RuntimeError(f"demo data self-check failed: {message}")


def country_profiles(rng: random.Random) -> dict[str, dict[str, str]]:
    """Fixed invented traits per country, so all documents about it agree."""
    return {
        country: {
            "country": country,
            "capital": oracle.KNOWLEDGE[country],
            "adjective": rng.choice(ADJECTIVES),
            "setting": rng.choice(SETTINGS),
            "landmark": rng.choice(LANDMARKS),
        }
        for country in sorted(oracle.KNOWLEDGE)
    }


def pt_document(profile: dict[str, str], rng: random.Random) -> str:
    """One encyclopedia paragraph about a country that states its capital several ways."""
    tail = rng.sample(MORE_FACT_SENTENCES, 1) + rng.sample(DETAIL_SENTENCES, rng.randint(1, 2))
    rng.shuffle(tail)
    sentences = [INTRO_SENTENCE, rng.choice(FIRST_FACT_SENTENCES), *tail]
    return " ".join(sentence.format(**profile) for sentence in sentences)


def pt_lines(
    cfg: DemoDataConfig, profiles: dict[str, dict[str, str]], rng: random.Random
) -> list[str]:
    """The lines of pt.txt: documents about every country in turn, in random order."""
    countries = _draw(sorted(profiles), cfg.n_pt_docs, rng)
    return [pt_document(profiles[country], rng) for country in countries]


def sft_records(cfg: DemoDataConfig, cells: Sequence[Cell], rng: random.Random) -> list[dict]:
    """The ShareGPT records of sft.jsonl; exactly round(flawed_fraction * n_sft) are flawed."""
    flawed = _exact_flags(cfg.flawed_fraction, cfg.n_sft, rng)
    with_system = _exact_flags(cfg.system_prompt_fraction, cfg.n_sft, rng)
    records = []
    for cell, is_flawed, has_system in zip(_draw(cells, cfg.n_sft, rng), flawed, with_system):
        prompt = ask(cell)
        plan = flaw_plan(rng.choice(SFT_FLAWS), rng) if is_flawed else GOOD
        response = render(plan, cell[0], rng)
        broken = list(oracle.score_parts(prompt, response).values()).count(0.0)
        _require(broken == (1 if is_flawed else 0), f"{response!r} breaks {broken} rules")
        turns = [{"from": "system", "value": SYSTEM_PROMPT}] if has_system else []
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
        records.append({"conversations": turns})
    return records


def preference_pair(cell: Cell, worse: bool, rng: random.Random) -> dict[str, str]:
    """One preference record: good vs flawed, or (if `worse`) flawed vs more flawed."""
    if worse:
        chosen_plan = flaw_plan(rng.choice(SFT_FLAWS), rng)
        rejected_plan = worsen(chosen_plan, rng)
    else:
        chosen_plan = GOOD
        flaw = rng.choices(list(REJECTED_FLAW_WEIGHTS), weights=list(REJECTED_FLAW_WEIGHTS.values()))[0]
        rejected_plan = flaw_plan(flaw, rng)
    prompt = ask(cell)
    chosen = render(chosen_plan, cell[0], rng)
    rejected = render(rejected_plan, cell[0], rng)
    _require(
        oracle.score(prompt, chosen) > oracle.score(prompt, rejected),
        f"chosen {chosen!r} does not beat rejected {rejected!r}",
    )
    return {"question": prompt, "response_chosen": chosen, "response_rejected": rejected}


def preference_records(
    cfg: DemoDataConfig, cells: Sequence[Cell], rng: random.Random
) -> list[dict]:
    """The records of preferences.jsonl; a `WORSE_PAIR_FRACTION` of them are flawed vs worse."""
    worse = _exact_flags(WORSE_PAIR_FRACTION, cfg.n_preferences, rng)
    cells_used = _draw(cells, cfg.n_preferences, rng)
    return [preference_pair(cell, is_worse, rng) for cell, is_worse in zip(cells_used, worse)]


def prompt_records(cells: Sequence[Cell], count: int, rng: random.Random) -> list[dict]:
    """`count` records {"prompt": question}, dealt evenly from `cells`."""
    return [{"prompt": ask(cell)} for cell in _draw(cells, count, rng)]


def _write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write one line per item (UTF-8, "\\n" endings) and return how many were written."""
    lines = list(lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    return len(lines)


def _jsonl(records: Iterable[dict]) -> list[str]:
    """Records as JSON lines, keys in the order they were built."""
    return [json.dumps(record, ensure_ascii=False) for record in records]


def generate(out_dir: Path, cfg: DemoDataConfig = DemoDataConfig()) -> dict[str, int]:
    """Write the five demo files into `out_dir` (created if missing); return lines per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    master = random.Random(cfg.seed)
    train_cells, eval_cells = split_grid(master)
    profiles = country_profiles(master)
    pt_rng, sft_rng, pref_rng, prompt_rng, eval_rng = (
        random.Random(master.getrandbits(64)) for _ in range(5)
    )
    contents = {
        PT_FILE: pt_lines(cfg, profiles, pt_rng),
        SFT_FILE: _jsonl(sft_records(cfg, train_cells, sft_rng)),
        PREFERENCES_FILE: _jsonl(preference_records(cfg, train_cells, pref_rng)),
        PROMPTS_FILE: _jsonl(prompt_records(train_cells, cfg.n_prompts, prompt_rng)),
        EVAL_PROMPTS_FILE: _jsonl(prompt_records(eval_cells, cfg.n_eval_prompts, eval_rng)),
    }
    return {name: _write_lines(out_dir / name, lines) for name, lines in contents.items()}


def _parser() -> argparse.ArgumentParser:
    """Command line: OUT_DIR plus one optional flag per `DemoDataConfig` field."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_core.demo.data", description="Write the demo RLHF data set."
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="directory to write into")
    for item in dataclasses.fields(DemoDataConfig):
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            dest=item.name,
            type=type(item.default),
            default=item.default,
            help=f"default: {item.default}",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m rlhf_core.demo.data`; prints the line counts as JSON."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    try:
        cfg = DemoDataConfig(**args)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(generate(out_dir, cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
