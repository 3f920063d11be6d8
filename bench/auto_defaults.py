"""Do the "auto" defaults give a good model? Each dataset is trained with only dataset.path (and the held-out
set) given, and with a small hand grid of the settings a practitioner would try; the fine-tuned exact
match of every run is printed, with its steps, wall time and peak memory.

    .venv/bin/python bench/auto_defaults.py [--datasets short300,short3000,long300] [--grid small|trl|none]

The datasets are the json-extraction task (examples/json-extraction: name, age and city out of a
sentence, answered as JSON) at three shapes: 300 and 3,000 short chats (a system prompt, a one-line
question, a one-line answer) and 300 long ones (the sentence hidden in a paragraph of ~40 distractor
sentences). The base model is the bundled SmolLM2-135M-Instruct. Run it alone on the machine: the
numbers that matter are exact match (not timing-sensitive) and the ratios of wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILLER = [
    "The meeting ran longer than planned.", "Rain is expected again on Thursday.", "The report was filed on time.",
    "Nobody remembered where the keys were.", "The train was twenty minutes late.", "Prices rose slightly last month.",
    "The garden needs watering twice a week.", "A new bakery opened on the corner.", "The printer is out of paper.",
    "Tickets sold out within an hour.", "The bridge will be closed for repairs.", "The museum is free on Sundays.",
]
# The hand grid: what a TRL user would try on such data (batch 8 examples, unpacked, 2-3 epochs, lr 1e-4..4e-4).
GRID = {
    "trl-like lr2e-4 bs8 2ep": ["training.packing=false", "training.batch_size=8", "training.num_epochs=2",
                                "training.learning_rate=2e-4"],
    "lr4e-4 bs8 3ep": ["training.packing=false", "training.batch_size=8", "training.num_epochs=3",
                       "training.learning_rate=4e-4"],
    "lr1e-4 bs8 3ep": ["training.packing=false", "training.batch_size=8", "training.num_epochs=3",
                       "training.learning_rate=1e-4"],
}


def _example_maker():
    spec = importlib.util.spec_from_file_location("generate", REPO / "examples" / "json-extraction" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_example


def write_dataset(directory: Path, name: str) -> tuple[Path, Path]:
    kind, count = ("long", int(name[4:])) if name.startswith("long") else ("short", int(name[5:]))
    make_example, rng = _example_maker(), random.Random(11)
    paths = directory / f"{name}.train.jsonl", directory / f"{name}.val.jsonl"
    for path, n in zip(paths, (count, 48)):
        with open(path, "w", encoding="utf-8") as handle:
            for _ in range(n):
                example = make_example(rng)
                if kind == "long":
                    sentences = rng.sample(FILLER * 4, 40)
                    sentences.insert(rng.randrange(len(sentences)), example["messages"][1]["content"])
                    example["messages"][1]["content"] = " ".join(sentences)
                handle.write(json.dumps(example) + "\n")
    return paths


def run_job(train: Path, val: Path, overrides: list[str], job_dir: Path) -> dict:
    job = job_dir.with_suffix(".yaml")
    job.write_text(f"dataset: {{path: {train}, validation_path: {val}}}\n"
                   "evaluation: {metrics: [loss, exact_match], max_new_tokens: 48, eval_before_training: false}\n")
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(job), "--job-dir", str(job_dir), *overrides]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(job_dir.with_suffix(".log"), "w"))
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": job_dir.with_suffix(".log").read_text()[-600:], "wall_s": wall}
    summary = json.loads((job_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    plan = next((e for e in events if (e.get("data") or {}).get("kind") == "plan"), {})
    # Real (non-padding) tokens per second of the training loop, the first step (warm-up) left out.
    rates = [e["data"]["tokens_per_second"] for e in events if e.get("type") == "metrics" and e["data"].get("step", 0) > 1]
    return {"exact_match": summary["eval"]["fine_tuned"]["exact_match"], "steps": summary["steps"],
            "wall_s": wall, "train_s": summary["train_seconds"], "peak_rss_gib": usage.ru_maxrss / (1 << 20),
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else float("nan"), "plan": plan.get("message", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="short300,short3000,long300")
    parser.add_argument("--grid", choices=("small", "trl", "none"), default="small",
                        help="small: the three hand-grid points; trl: only the TRL-like one (2 epochs, lr 2e-4); none")
    args = parser.parse_args()
    grid = {"small": GRID, "trl": dict(list(GRID.items())[:1]), "none": {}}[args.grid]
    configs = {"defaults (auto)": [], **grid}
    with tempfile.TemporaryDirectory(prefix="auto-defaults-") as tmp:
        work = Path(tmp)
        for name in args.datasets.split(","):
            train, val = write_dataset(work, name)
            results = {}
            for label, overrides in configs.items():
                results[label] = run_job(train, val, overrides, work / f"{name}-{len(results)}")
                r = results[label]
                print(f"{name:<10} {label:<26} " + (f"exact match {r['exact_match']:.2f}  steps {r['steps']:>4}  "
                      f"{r['wall_s'] / 60:5.1f} min (training {r['train_s'] / 60:4.1f})  real tokens/s "
                      f"{r['tokens_per_s']:6.0f}  peak {r['peak_rss_gib']:.1f} GiB" if "error" not in r
                      else f"FAILED after {r['wall_s']:.0f} s: {r['error']}"), flush=True)
                if label.startswith("defaults") and "plan" in r:
                    print(f"           plan: {r['plan']}", flush=True)
            scored = {k: v["exact_match"] for k, v in results.items() if "exact_match" in v}
            if scored and "defaults (auto)" in scored and len(scored) > 1:
                best = max(v for k, v in scored.items() if k != "defaults (auto)")
                print(f"{name:<10} defaults - best of grid: {scored['defaults (auto)'] - best:+.2f}", flush=True)


if __name__ == "__main__":
    main()
