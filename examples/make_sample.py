"""Write a small general-knowledge sample in the public formats, for the SmolLM2 recipe.

    python examples/make_sample.py [--out data/sample] [--seed 0]

Every fact below was written for this project (no third-party data). The files use the shapes
users bring: plain text for PT, an Alpaca JSON array for SFT (LLaMA-Factory's layout), hh-rlhf
style "Human:/Assistant:" transcripts with an implicit shared prompt for preferences, and
`{"prompt"}` for PPO and evaluation prompts. The preferences prefer a correct,
polite and brief answer; the rejected side is wrong, curt or rambling. Facts used for the
evaluation prompts appear in no training file, so the evaluation asks questions nobody trained on.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (question, short answer, a wrong answer)
FACTS = [
    ("What is the capital of France?", "Paris", "Lyon"),
    ("What is the capital of Japan?", "Tokyo", "Osaka"),
    ("What is the capital of Canada?", "Ottawa", "Toronto"),
    ("What is the capital of Australia?", "Canberra", "Sydney"),
    ("What is the capital of Italy?", "Rome", "Milan"),
    ("What is the capital of Spain?", "Madrid", "Barcelona"),
    ("What is the capital of Germany?", "Berlin", "Munich"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria"),
    ("What is the capital of Kenya?", "Nairobi", "Mombasa"),
    ("What is the capital of Brazil?", "Brasilia", "Rio de Janeiro"),
    ("What is the capital of Turkey?", "Ankara", "Istanbul"),
    ("What is the capital of Norway?", "Oslo", "Bergen"),
    ("How many days are in a leap year?", "366", "365"),
    ("How many minutes are in an hour?", "60", "100"),
    ("How many legs does a spider have?", "eight", "six"),
    ("How many continents are there?", "seven", "five"),
    ("At what temperature in Celsius does water boil at sea level?", "100 degrees", "90 degrees"),
    ("At what temperature in Celsius does water freeze?", "0 degrees", "10 degrees"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus"),
    ("Which planet is known as the Red Planet?", "Mars", "Jupiter"),
    ("What is the largest planet in the solar system?", "Jupiter", "Saturn"),
    ("What gas do plants take in for photosynthesis?", "carbon dioxide", "oxygen"),
    ("What is the chemical symbol for gold?", "Au", "Ag"),
    ("What is the chemical symbol for sodium?", "Na", "So"),
    ("What is H2O commonly called?", "water", "salt"),
    ("How many sides does a hexagon have?", "six", "eight"),
    ("What is 7 times 8?", "56", "54"),
    ("What is 12 plus 15?", "27", "25"),
    ("What is the square root of 81?", "9", "8"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens"),
    ("What is the longest river in Africa?", "the Nile", "the Congo"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", "the Atlantic Ocean"),
    ("What is the tallest mountain on Earth?", "Mount Everest", "K2"),
    ("Which organ pumps blood through the body?", "the heart", "the liver"),
    ("How many bones does an adult human have?", "206", "212"),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees", "0 degrees"),
    ("Which metal is liquid at room temperature?", "mercury", "iron"),
    ("What is the primary language spoken in Brazil?", "Portuguese", "Spanish"),
    ("How many hours are in a day?", "24", "12"),
    ("What is the hardest natural material?", "diamond", "granite"),
]
OPENERS = ["Sure!", "Of course.", "Happy to help.", "Certainly."]
RAMBLE = (" Many people find questions like this interesting, and there is a lot more one could say "
          "about the history and the background of the topic, so let me go on about it at some length.")
SYSTEM = "You are a helpful assistant. Answer correctly, politely and briefly."


def good(answer: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} The answer is {answer}."


def bad(answer: str, wrong: str, rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.choice(OPENERS)} The answer is {wrong}."  # wrong fact
    if kind == 1:
        return f"Obviously {answer}. Look it up yourself."  # curt
    return f"{rng.choice(OPENERS)} The answer is {answer}.{RAMBLE}"  # rambling


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make(out: Path, seed: int = 0, n_eval: int = 8) -> dict[str, int]:
    rng = random.Random(seed)
    facts = FACTS[:]
    rng.shuffle(facts)
    train, held_out = facts[n_eval:], facts[:n_eval]
    out.mkdir(parents=True, exist_ok=True)
    pt = [text for q, a, _ in train for text in (
        f"{q} The answer is {a}.",
        f"A common question is this one: {q} Most reference books agree that the answer is {a}, not {rng.choice(facts)[2]}.",
        f"Quiz note. Question: {q} Answer: {a}. Keep answers short, correct and polite.")]
    (out / "pt.txt").write_text("\n".join(pt) + "\n", encoding="utf-8")
    sft, prefs, prompts = [], [], []
    for rep in range(3):
        for q, a, w in train:
            sft.append({"instruction": q, "input": "", "output": good(a, rng), "system": SYSTEM if rep == 1 else ""})
            human = f"\n\nHuman: {q}\n\nAssistant: "
            prefs.append({"chosen": human + good(a, rng), "rejected": human + bad(a, w, rng)})
            prompts.append({"prompt": q})
    (out / "sft.json").write_text(json.dumps(sft, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_jsonl(out / "preferences.jsonl", prefs)
    write_jsonl(out / "prompts.jsonl", prompts)
    write_jsonl(out / "eval_prompts.jsonl", [{"prompt": q} for q, _, _ in held_out])
    return {"pt": len(pt), "sft": len(sft), "preference": len(prefs), "prompts": len(prompts), "eval_prompts": n_eval}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/sample")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    counts = make(Path(a.out), a.seed)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
