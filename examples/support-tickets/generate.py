"""Generate the support-tickets example dataset: route a customer message to one of four teams (A-D).

A classification task scored by accuracy with a declared answer extractor (`evaluation.accuracy:
{choices: ABCD}`): the reply is the letter of the team. A third of the messages also mention another
team's topic in passing ("the payment went through fine"), so matching a keyword is not enough, and the
validation messages describe problems the training set never words (the last two of each team's list),
so the model must generalize rather than recall. Deterministic: the same seed writes the same files, and a test checks the committed files
against this script.

    python examples/support-tickets/generate.py [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM = ("Route the customer's message to the team that must act on it. Teams: A) Billing B) Shipping "
          "C) Technical support D) Account and login. Answer with the letter only.")
ISSUES = {
    "A": [
        "I was charged twice for my last order", "my invoice shows the wrong amount",
        "the refund you promised has not reached my card", "please cancel the renewal fee you took this morning",
        "why did my monthly price go up", "the discount code was not applied to my payment",
        "I need a VAT invoice for the purchase", "my card was declined but the money left my account",
    ],
    "B": [
        "my parcel has not arrived after two weeks", "the tracking number does not work",
        "the box arrived damaged and the item is broken", "I received someone else's order",
        "can you deliver to a different address", "the courier left the package at the wrong door",
        "my order is stuck in customs", "only half of the items were in the delivery",
    ],
    "C": [
        "the app crashes every time I open the camera", "the device will not connect to wifi",
        "the firmware update froze halfway", "the screen stays black after the logo",
        "sync between my phone and laptop stopped working", "the battery drains in two hours since the update",
        "I get error 502 when I upload a file", "the printer driver will not install on my computer",
    ],
    "D": [
        "I cannot log in even after resetting my password", "I never receive the two-factor code",
        "please change the email address on my profile", "someone else seems to have access to my account",
        "I want to delete my account and my data", "my username was changed without my permission",
        "the password reset link has expired", "I am locked out after too many attempts",
    ],
}
# Side remarks about another team's topic that need no action from it.
ASIDES = {
    "A": "the payment itself went through fine", "B": "the delivery was quick as always",
    "C": "the app works well otherwise", "D": "I can log in without problems",
}
OPENERS = ["Hi,", "Hello team,", "Good morning.", "Hey,", "Dear support,", ""]
CLOSERS = ["Thanks.", "Please help.", "Can you sort this out?", "This is urgent.", "Regards, a customer.", ""]


HELD_OUT = 2  # per team: the issues only the validation set uses


def make_example(rng: random.Random, *, held_out: bool) -> dict:
    team = rng.choice("ABCD")
    issues = ISSUES[team][-HELD_OUT:] if held_out else ISSUES[team][:-HELD_OUT]
    issue = rng.choice(issues)
    parts = [rng.choice(OPENERS), issue[0].upper() + issue[1:] + "."]
    if rng.random() < 1 / 3:
        other = rng.choice([t for t in "ABCD" if t != team])
        parts.insert(1, f"To be clear, {ASIDES[other]}.")
    parts.append(rng.choice(CLOSERS))
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": " ".join(p for p in parts if p)},
            {"role": "assistant", "content": team},
        ]
    }


def generate(out_dir: Path, *, train: int = 320, val: int = 64, seed: int = 11) -> None:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count, held_out in (("train.jsonl", train, False), ("val.jsonl", val, True)):
        with open(out_dir / name, "w", encoding="utf-8") as handle:
            for _ in range(count):
                handle.write(json.dumps(make_example(rng, held_out=held_out)) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
