"""The quality table: LoRA, QLoRA and full fine-tuning of SmolLM2-135M-Instruct on two of the project's
tasks, each against the base model on every metric, with the job's time and peak memory.

    .venv/bin/python bench/quality.py [--tasks json-extraction,support-tickets] [--methods lora,qlora,full]
                                      [--steps 16] [--parallel 1] [--out quality.json] [--work-dir DIR]
    .venv/bin/python bench/quality.py --model tiny-llama --steps 2 --parallel 3     # the bench end to end, minutes

Tasks (data made by the project, examples/<task>/generate.py):
  json-extraction   a sentence about a person -> {"name", "age", "city"}: exact match, JSON validity and
                    JSON-schema match on 32 held-out sentences, plus eval loss and perplexity
  support-tickets   a customer message -> the team's letter A-D: classification accuracy with a declared
                    answer extractor (choices ABCD) and exact match on 48 messages whose problems the
                    training set never words, plus eval loss
Methods: each job is configs/sft/smollm2-135m-lora.yaml with the task's data and metrics, `--steps`
optimizer steps of 2 packed rows (the same seed, so every method trains on the same tokens in the same
order; the table prints the tokens each job saw), run by `tuneforge train` one after the other (or
`--parallel N` at once, each on one thread):
  lora    rank 16, alpha 32, all linear layers, lr 5e-4 (the shipped config)
  qlora   the same adapter on the base loaded in 4-bit NF4 by bitsandbytes
  full    every weight trained, lr 5e-5 (full fine-tuning needs a learning rate ~10x smaller than LoRA's)
The metrics come from each job's evaluation.json (the recipe's own evaluation: greedy, 95% intervals; the
base model is scored by the first method's job of each task only, the rest skip it to save time);
time is the `tuneforge train` wall clock and its training part; memory is the recipe process's peak RSS.
At the end: whether LoRA is within 5% of full fine-tuning on the task metric and QLoRA within 2 points of
LoRA, the literature's bar (LoRA, Hu et al. 2021; QLoRA, Dettmers et al. 2023).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sft" / "smollm2-135m-lora.yaml"
PERSON_SCHEMA = {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False,
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
TASKS = {
    "json-extraction": {
        "task_metric": "exact_match",
        "evaluation": {"metrics": ["loss", "perplexity", "exact_match", "json_valid", "json_schema"],
                       "json_schema": PERSON_SCHEMA, "max_new_tokens": 40, "max_eval_examples": 32},
    },
    "support-tickets": {
        "task_metric": "accuracy",
        "evaluation": {"metrics": ["loss", "accuracy", "exact_match"], "accuracy": {"choices": "ABCD"},
                       "max_new_tokens": 8, "max_eval_examples": 48},
    },
}
PARALLEL = 1  # --parallel
METHODS = {
    "lora": {"adapter": {"type": "lora"}, "training": {"learning_rate": 5.0e-4}},
    "qlora": {"adapter": {"type": "qlora"}, "model": {"quantization": "nf4"}, "training": {"learning_rate": 5.0e-4}},
    "full": {"adapter": {"type": "full"}, "training": {"learning_rate": 5.0e-5}},
}


MODEL = "smollm2-135m-instruct"  # --model


def job_file(task: str, method: str, steps: int, work: Path, *, score_base: bool) -> Path:
    """configs/sft/smollm2-135m-lora.yaml with the task's data and metrics and the method's adapter."""
    spec = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    data = REPO / "examples" / task
    spec["name"] = f"quality-{task}-{method}"
    spec["model"]["base_model"] = MODEL
    spec["dataset"].update(path=str(data / "train.jsonl"), validation_path=str(data / "val.jsonl"))
    spec["evaluation"] = {**TASKS[task]["evaluation"], "report_samples": 3, "eval_before_training": score_base}
    spec["training"].update(max_steps=steps)
    spec["training"].pop("num_epochs", None)
    spec["checkpoint"] = {"every_steps": None, "keep_last": 1}  # one checkpoint, at the end
    for section, values in METHODS[method].items():
        spec.setdefault(section, {}).update(values)
    path = work / f"{task}-{method}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run(task: str, method: str, steps: int, work: Path, *, score_base: bool) -> dict:
    from tuneforge.spec.jobdir import read_report, read_summary

    job_dir = work / f"{task}-{method}"
    log = work / f"{task}-{method}.log"
    started = time.monotonic()
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if PARALLEL > 1 else {})}
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([str(Path(sys.executable).with_name("tuneforge")), "train",
                               str(job_file(task, method, steps, work, score_base=score_base)), "--job-dir", str(job_dir)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{task} {method}: tuneforge train exited {done.returncode}; see {log}")
    summary, report = read_summary(job_dir), read_report(job_dir)
    return {"task": task, "method": method, "wall_s": wall, "train_s": summary.train_seconds,
            "steps": summary.steps, "tokens_seen": summary.tokens_seen, "trained_tokens": summary.trained_tokens,
            "trainable_parameters": summary.trainable_parameters,
            "peak_rss_bytes": max(r.peak_memory_bytes for r in summary.ranks),
            "report": report.model_dump(mode="json")}


def estimate(row: dict, side: str) -> str:
    value = row.get(side) or {}
    if value.get("value") is None:
        return "-"
    text = f"{value['value']:.3f}" if abs(value["value"]) < 100 else f"{value['value']:.1f}"
    if value.get("low") is not None:
        text += f" [{value['low']:.2f}, {value['high']:.2f}]"
    return text


def table(task: str, results: list[dict]) -> list[str]:
    runs = [r for r in results if r["task"] == task]
    metrics = [row["metric"] for row in runs[0]["report"]["rows"]]
    n = runs[0]["report"]["examples"]
    lines = [f"### {task} ({n} held-out examples; task metric: {TASKS[task]['task_metric']})", "",
             "| model | " + " | ".join(metrics) + " | train s | job s | peak RSS GiB | tokens seen |",
             "|---|" + "---|" * (len(metrics) + 4)]
    base = next((r for r in runs if any(row.get("base") for row in r["report"]["rows"])), None)
    if base is not None:
        lines.append("| base | " + " | ".join(estimate(row, "base") for row in base["report"]["rows"]) + " | | | | |")
    for r in runs:
        rows = r["report"]["rows"]
        lines.append(f"| {r['method']} | " + " | ".join(estimate(row, "fine_tuned") for row in rows)
                     + f" | {r['train_s']:.0f} | {r['wall_s']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} "
                     f"| {r['tokens_seen']:,} |")
    return lines


def task_value(results: list[dict], task: str, method: str) -> float | None:
    for r in results:
        if r["task"] == task and r["method"] == method:
            for row in r["report"]["rows"]:
                if row["metric"] == TASKS[task]["task_metric"]:
                    return row["fine_tuned"]["value"]
    return None


def verdicts(task: str, results: list[dict]) -> list[str]:
    lora, qlora, full = (task_value(results, task, m) for m in ("lora", "qlora", "full"))
    metric = TASKS[task]["task_metric"]
    lines = []
    if lora is not None and full is not None and not full:
        lines.append(f"- {task}: full fine-tuning scored {metric} 0: the 95% bar says nothing (train longer)")
    elif lora is not None and full is not None:
        ratio = lora / full
        lines.append(f"- {task}: LoRA {metric} {lora:.3f} vs full {full:.3f}: {ratio:.1%} of full "
                     f"({'meets' if ratio >= 0.95 else 'misses'} the 95% bar)")
    if lora is not None and qlora is not None:
        points = (lora - qlora) * 100
        lines.append(f"- {task}: QLoRA {metric} {qlora:.3f} vs LoRA {lora:.3f}: {points:+.1f} points below LoRA "
                     f"({'meets' if points <= 2 else 'misses'} the 2-point bar)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=["smollm2-135m-instruct", "tiny-llama"],
                        help="tiny-llama (2 layers, random weights) checks the bench end to end in minutes")
    parser.add_argument("--parallel", type=int, default=1,
                        help="jobs run at once (each with OMP_NUM_THREADS=1 when above 1: one core each)")
    parser.add_argument("--out", type=Path, default=None, help="also write every result as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the jobs go (default: a new temp dir)")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown task or method: {', '.join(unknown)}")
    import tempfile

    global PARALLEL, MODEL
    PARALLEL, MODEL = args.parallel, args.model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tuneforge-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = "1" if args.parallel > 1 else os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{MODEL}; jobs in {work}; {args.steps} steps each, {args.parallel} at a time, OMP_NUM_THREADS={threads}", flush=True)
    # The base is the same model for every method (QLoRA's 4-bit base aside): scored once per task.
    runs = [(task, method, method == methods[0]) for task in tasks for method in methods]
    results = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(run, task, method, args.steps, work, score_base=base): (task, method)
                   for task, method, base in runs}
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"{result['task']} {result['method']}: {result['wall_s']:.0f} s, "
                  f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    order = {(task, method): i for i, (task, method, _) in enumerate(runs)}
    results.sort(key=lambda r: order[(r["task"], r["method"])])
    for task in tasks:
        print("\n".join(["", *table(task, results)]))
    print("\n".join(["", *[line for task in tasks for line in verdicts(task, results)]]))


if __name__ == "__main__":
    main()
