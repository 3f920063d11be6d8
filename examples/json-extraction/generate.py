"""Generate the json-extraction example dataset: pull a person's name, age and city out of a sentence.

The base SmolLM2-135M-Instruct answers in prose or malformed JSON; after a few minutes of LoRA it
answers with exactly {"name": ..., "age": ..., "city": ...}. Deterministic: the same seed writes the same
files, and a test checks the committed files against this script.

    python examples/json-extraction/generate.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM = "Extract the person's name, age and city from the text. Answer with JSON only."
NAMES = [
    "Maria", "James", "Aiko", "Lars", "Fatima", "Diego", "Chen", "Olga", "Kwame", "Priya", "Tom", "Ingrid",
    "Mateo", "Yusuf", "Elena", "Ravi", "Sofia", "Hugo", "Amara", "Lukas", "Nadia", "Omar", "Clara", "Kenji",
    "Zara", "Pablo", "Freya", "Ibrahim", "Mei", "Anton", "Leila", "Marco", "Hana", "Felix", "Rosa", "Tariq",
    "Greta", "Samuel", "Yara", "Victor", "Noor", "Emil", "Lucia", "Arjun", "Beatriz", "Oscar", "Sana", "Jonas",
]
CITIES = [
    "Lisbon", "Chicago", "Osaka", "Oslo", "Cairo", "Lima", "Shanghai", "Kyiv", "Accra", "Pune", "Leeds", "Bergen",
    "Seville", "Ankara", "Athens", "Chennai", "Milan", "Lyon", "Lagos", "Munich", "Tunis", "Doha", "Vienna",
    "Kyoto", "Nairobi", "Bogota", "Aarhus", "Dakar", "Taipei", "Gdansk", "Beirut", "Naples", "Busan", "Zurich",
    "Quito", "Karachi", "Uppsala", "Denver", "Amman", "Porto", "Manila", "Turin", "Hanoi", "Ghent", "Perth",
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} just turned {age}.",
    "At {age}, {name} moved to {city} for work.",
    "{name} ({age}) is based in {city}.",
    "Our new colleague {name} comes from {city} and is {age}.",
    "{city} resident {name}, aged {age}, won the local chess tournament.",
    "Meet {name}: {age} years old, from {city}.",
    "The package was signed for by {name}, {age}, of {city}.",
    "Born and raised in {city}, {name} is now {age}.",
    "{name}, a {age}-year-old teacher from {city}, wrote the letter.",
    "The winner, {name} from {city}, is {age} years old.",
    "I met {name} in {city}; she was {age} at the time.",
]


def make_example(rng: random.Random) -> dict:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
    text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
    }


def generate(out_dir: Path, *, train: int = 320, val: int = 48, seed: int = 7) -> None:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.jsonl", train), ("val.jsonl", val)):
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for _ in range(count):
                handle.write(json.dumps(make_example(rng)) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
