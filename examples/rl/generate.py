"""Generate the answer-format RL task: short questions whose reply must end with `Answer: <word>`.

The reward is two graders in OpenAI's shapes (configs/ppo and configs/grpo name them): `format`, the reply
contains "Answer:", and `correct`, it contains "Answer: " followed by the right word. A completion passes
when both hold. The base SmolLM2-135M-Instruct answers the questions in prose and seldom in the format;
online RL (PPO, GRPO) teaches the format from the graders alone, with no reference replies to imitate.
Deterministic: the same seed writes the same files.

    python examples/rl/generate.py [OUT_DIR]      # prompts.jsonl (training) and held_out.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

INSTRUCTION = "End your reply with a line of the form 'Answer: <word>'."
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad", "open": "closed",
    "wet": "dry", "light": "dark", "old": "new", "hard": "soft", "early": "late", "full": "empty", "high": "low",
    "rich": "poor", "strong": "weak", "thick": "thin", "loud": "quiet", "clean": "dirty", "long": "short",
    "win": "lose", "push": "pull", "left": "right", "first": "last", "inside": "outside", "top": "bottom",
}
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Germany": "Berlin", "Egypt": "Cairo",
    "Russia": "Moscow", "England": "London", "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo",
    "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Kenya": "Nairobi", "Peru": "Lima",
    "China": "Beijing", "Cuba": "Havana", "Sweden": "Stockholm", "Thailand": "Bangkok",
}
COLORS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow", "blood": "red",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def questions() -> list[tuple[str, str]]:
    found = [(f"What is the opposite of '{w}'?", a) for w, a in OPPOSITES.items()]
    found += [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items()]
    found += [(f"What color is {thing}?", a) for thing, a in COLORS.items()]
    found += [(f"What is {a} plus {b}? Answer with a word.", NUMBERS[a + b]) for a in range(1, 6) for b in range(1, 6)
              if a + b <= 10]
    return found


def record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "answer": answer}


def main(out_dir: Path, seed: int = 0, held_out: int = 24) -> None:
    rows = [record(q, a) for q, a in questions()]
    random.Random(seed).shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("held_out.jsonl", rows[:held_out]), ("prompts.jsonl", rows[held_out:])):
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows) - held_out} training and {held_out} held-out prompts to {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
