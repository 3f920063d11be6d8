"""Generate the preference example dataset: prefer the correct ISO 8601 date over a wrong one.

Each prompt names a date in words ("Write March 14, 2021 as an ISO 8601 date."); the chosen reply is the
date in ISO form ("2021-03-14"); the rejected one is wrong in one of four ways, in equal shares: another
format (14/03/2021), the day off by one (2021-03-15), the year off (2020-03-14), or month and day swapped
(2021-14-03 when that is no date, else another month). A reward model must learn to check the reply
against the prompt; DPO must move the likelier reply to the correct one. TRL's standard preference shape
(prompt / chosen / rejected strings). Deterministic: the same seed writes the same files.

    python examples/preference/generate.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from datetime import date, timedelta
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PROMPTS = [
    "Write {words} as an ISO 8601 date.",
    "Convert {words} to the YYYY-MM-DD format.",
    "What is {words} in ISO 8601 form? Answer with the date only.",
    "Give the ISO date (YYYY-MM-DD) for {words}.",
]
MISTAKES = ("format", "day", "year", "swap")


def in_words(day: date, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def wrong(day: date, mistake: str, rng: random.Random) -> str:
    if mistake == "format":
        return rng.choice([f"{day.day:02d}/{day.month:02d}/{day.year}", f"{day.month:02d}/{day.day:02d}/{day.year}",
                           f"{day.day}.{day.month}.{day.year}"])
    if mistake == "day":
        return (day + timedelta(days=rng.choice([-1, 1]))).isoformat()
    if mistake == "year":
        return day.replace(year=day.year + rng.choice([-1, 1])).isoformat() if (day.month, day.day) != (2, 29) \
            else (day + timedelta(days=1)).isoformat()
    if day.day > 12 or day.day == day.month:  # swapped month and day is no date, or the same one
        return f"{day.year}-{day.day:02d}-{day.month:02d}" if day.day != day.month else \
            day.replace(month=day.month % 12 + 1, day=min(day.day, 28)).isoformat()
    return day.replace(month=day.day, day=day.month).isoformat()


def make_pair(rng: random.Random, mistake: str) -> dict:
    day = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 100))
    prompt = rng.choice(PROMPTS).format(words=in_words(day, rng))
    return {"prompt": prompt, "chosen": day.isoformat(), "rejected": wrong(day, mistake, rng), "mistake": mistake}


def generate(out_dir: Path, *, train: int = 400, val: int = 100, seed: int = 11) -> None:
    rng = random.Random(seed)
    pairs = [make_pair(rng, MISTAKES[i % len(MISTAKES)]) for i in range(train + val)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", pairs[:train]), ("val.jsonl", pairs[train:])):
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
