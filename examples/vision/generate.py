"""Coloured shapes and their names: the vision example (method vlm: "what colour is the shape?"; method clip:
captions such as "a red circle"). Seeded, so the committed files are what this writes.

    python examples/vision/generate.py [OUT_DIR]

Writes images/*.png (32 x 32), chat.train.jsonl / chat.val.jsonl (image_chat: OpenAI's vision format, the
images as paths relative to the file) and pairs.train.jsonl / pairs.val.jsonl (image_text). The validation
images are drawn apart from the training ones (other seeds, so other positions and sizes); the CLIP
validation set holds each colour-shape pair once, so every caption names one image.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
SIZE = 32
QUESTIONS = ("What colour is the shape?", "Name the colour of the shape.", "Which colour is this shape?")
TRAIN, VAL = 64, 16


def draw(colour: str, shape: str, rng: random.Random):
    """A shape of one colour on a light background, at a random place and size."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    side = rng.randint(14, 24)
    x, y = rng.randint(1, SIZE - side - 1), rng.randint(1, SIZE - side - 1)
    box = (x, y, x + side, y + side)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def chat(image: str, question: str, colour: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": colour},
    ]}


def generate(out: Path) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sets = {"train": [], "val": []}
    rng = random.Random(0)
    for index in range(TRAIN):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        sets["train"].append((f"images/train-{index:03d}.png", colour, shape, rng.choice(QUESTIONS)))
    rng_val = random.Random(1)
    for index in range(VAL):
        colour, shape = list(COLOURS)[index % 4], SHAPES[(index // 4) % 3]
        sets["val"].append((f"images/val-{index:03d}.png", colour, shape, rng_val.choice(QUESTIONS)))
    for split, rows in sets.items():
        drawing = random.Random({"train": 10, "val": 11}[split])
        for path, colour, shape, _ in rows:
            draw(colour, shape, drawing).save(out / path, format="PNG", optimize=False)
        with open(out / f"chat.{split}.jsonl", "w", encoding="utf-8") as handle:
            for path, colour, _, question in rows:
                handle.write(json.dumps(chat(path, question, colour)) + "\n")
        # CLIP's validation: the first 12 validation images are each colour-shape pair once.
        pairs = rows if split == "train" else rows[: len(COLOURS) * len(SHAPES)]
        with open(out / f"pairs.{split}.jsonl", "w", encoding="utf-8") as handle:
            for path, colour, shape, _ in pairs:
                handle.write(json.dumps({"image": path, "text": f"a {colour} {shape}"}) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
