"""Regenerates the data of the built-in lm-eval suites (deterministic): python suites/make_builtin_data.py"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def arith(rng: random.Random, n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["plus", "minus", "times"])
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        wrong = {value + 1, value - 1, value + 10, value - 10, a + b if op != "plus" else a * b}
        wrong.discard(value)
        choices = [value, *rng.sample(sorted(wrong), 3)]
        rng.shuffle(choices)
        rows.append({
            "id": f"arith-{offset + i}",
            "question": f"What is {a} {op} {b}?",
            "choices": [str(c) for c in choices],
            "answer": choices.index(value),
        })
    return rows


FORMATS = [
    ("Write the date of the first day of 2024 as YYYY-MM-DD.", r"\d{4}-\d{2}-\d{2}"),
    ("Give a time of day in 24-hour HH:MM form.", r"([01]\d|2[0-3]):[0-5]\d"),
    ("Answer with a single word in lower case: what colour is the sky?", r"[a-z]+"),
    ("Answer yes or no: is water wet?", r"(yes|no)"),
    ("Write a number between 1 and 9 as a single digit.", r"[1-9]"),
    ("Write a price in euros with two decimals, like 3.50 EUR.", r"\d+\.\d{2} EUR"),
    ("Give an email address for a person called Ann at example.org.", r"[a-z.]+@example\.org"),
    ("Write a hexadecimal colour code such as #1a2b3c.", r"#[0-9a-fA-F]{6}"),
    ("Answer with TRUE or FALSE in capitals: two plus two is four.", r"(TRUE|FALSE)"),
    ("Write the name of a weekday with a capital first letter.", r"(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"),
    ("Write a year between 1900 and 1999 as four digits.", r"19\d\d"),
    ("Give a temperature in degrees Celsius, like 21C.", r"-?\d+C"),
]


def main() -> None:
    rng = random.Random(20261123)
    write(HERE / "arith" / "fewshot.jsonl", arith(rng, 20, 0))
    write(HERE / "arith" / "test.jsonl", arith(rng, 100, 20))
    write(HERE / "format" / "test.jsonl", [
        {"id": f"format-{i}", "instruction": text, "pattern": pattern} for i, (text, pattern) in enumerate(FORMATS)
    ])


if __name__ == "__main__":
    main()
