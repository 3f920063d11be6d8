"""Preference and RL methods on the project's synthetic preference task, before vs after, with time and memory.

    .venv/bin/python bench/rlhf.py [--model smollm2-135m-instruct|tiny] [--methods reward,dpo,ppo,grpo]
                                   [--train 128] [--val 64] [--epochs 1] [--online-steps N]

The task is examples/preference (prefer the correct ISO 8601 date for a date in words over a wrong one: another
format, the day or year off by one, month and day swapped). Each method is one row of METHODS, a function that
writes a job for the task, runs its recipe in a fresh process (so the peak memory is the method's own) and
returns the held-out metrics of the base and the trained model from the job's typed summary:

    reward  held-out pair accuracy and mean reward margin of the reward model (the head starts random)
    dpo     held-out chosen-over-rejected log-prob margin and preference accuracy, and exact match of greedy
            answers against the correct date (the task metric)

    ppo     held-out greedy mean reward, grader pass rate and KL to the reference, on the prompt task
    grpo    (examples/rl: end the reply with "Answer: <word>"; bench/rlhf_online.py runs these two alone)

`--model tiny` builds a 2-layer Llama from a config (seconds; numbers only show the plumbing; PPO / GRPO then
reward a reply containing "a", which a random tiny model can learn). Run it alone on the machine for timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "preference"


def write_subset(directory: Path, train: int, val: int) -> tuple[Path, Path]:
    paths = []
    for name, count in (("train.jsonl", train), ("val.jsonl", val)):
        lines = (DATA / name).read_text().splitlines()[:count]
        path = directory / name
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def run_job(method: str, spec: dict, work: Path) -> dict:
    """Run one job in its own process; its summary as JSON."""
    sys.path.insert(0, str(REPO / "src"))
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    job_dir = work / method
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, validate_job_spec(spec))
    done = subprocess.run([sys.executable, "-m", f"tuneforge.recipes.{method}", "--job-dir", str(job_dir),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode != 0:
        raise SystemExit(f"{method} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((job_dir / "summary.json").read_text())


def common(args, model: str, train: Path, val: Path) -> dict:
    return {
        "model": {"base_model": model},
        "dataset": {"path": str(train), "validation_path": str(val), "max_seq_length": 256},
        "adapter": {"type": "lora", "rank": 16, "alpha": 32, "dropout": 0.0},
        "training": {"batch_size": 8, "per_device_batch_size": 8, "num_epochs": args.epochs, "seed": 0},
        "checkpoint": {"every_minutes": 60},
        "evaluation": {"metrics": ["loss"], "max_eval_examples": args.val},
    }


def reward_row(args, model: str, train: Path, val: Path, work: Path) -> dict:
    spec = common(args, model, train, val)
    spec["method"] = "reward"
    spec["training"]["learning_rate"] = args.reward_lr
    summary = run_job("reward", spec, work)
    base, tuned = summary["eval"]["base"], summary["eval"]["fine_tuned"]
    return {"method": "reward", "summary": summary, "metrics": [
        ("pair accuracy", base["reward_accuracy"], tuned["reward_accuracy"]),
        ("reward margin", base["reward_margin"], tuned["reward_margin"]),
    ]}


def dpo_row(args, model: str, train: Path, val: Path, work: Path) -> dict:
    spec = common(args, model, train, val)
    spec["method"] = "dpo"
    spec["training"]["learning_rate"] = args.dpo_lr
    spec["dpo"] = {"beta": 0.1, "loss_type": "sigmoid"}
    spec["evaluation"].update({"metrics": ["loss", "exact_match"], "max_new_tokens": 16})
    summary = run_job("dpo", spec, work)
    base, tuned = summary["eval"]["base"], summary["eval"]["fine_tuned"]
    return {"method": "dpo", "summary": summary, "metrics": [
        ("log-prob margin", base["preference_margin"], tuned["preference_margin"]),
        ("preference accuracy", base["preference_accuracy"], tuned["preference_accuracy"]),
        ("implicit reward accuracy", base["reward_accuracy"], tuned["reward_accuracy"]),
        ("exact match (greedy)", base["exact_match"], tuned["exact_match"]),
    ]}


def online_row(method: str):
    """PPO and GRPO on the project's prompt task (examples/rl, bench/rlhf_online.py): held-out greedy reward,
    grader pass rate and KL to the reference, before and after."""

    def row(args, model: str, train: Path, val: Path, work: Path) -> dict:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import rlhf_online

        steps = args.online_steps or (30 if args.model == "tiny" else 20)
        result = rlhf_online.run(method, args.model if args.model == "tiny" else model, steps, work)
        base, tuned = result["base"], result["tuned"]
        summary = {"steps": result["steps"], "wall_time_s": result["seconds"],
                   "ranks": [{"peak_memory_bytes": result["peak_rss_gb"] * 1e9}]}
        return {"summary": summary, "metrics": [
            ("held-out mean reward", base.mean_reward, tuned.mean_reward),
            ("held-out pass rate", base.pass_rate, tuned.pass_rate),
            ("KL to reference (nats)", base.kl_to_reference, tuned.kl_to_reference),
        ]}

    return row


METHODS = {"reward": reward_row, "dpo": dpo_row, "ppo": online_row("ppo"), "grpo": online_row("grpo")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a base model name or directory, or tiny")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train", type=int, default=128, help="training pairs (of the 400)")
    parser.add_argument("--val", type=int, default=64, help="held-out pairs (of the 100)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--reward-lr", type=float, default=3e-4)
    parser.add_argument("--dpo-lr", type=float, default=2e-4)
    parser.add_argument("--online-steps", type=int, default=None, help="ppo / grpo steps (tiny: 30, else 20)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    os.environ.setdefault("TUNEFORGE_HOME", str(Path.home() / ".tuneforge"))
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(REPO / "src"))
        from tuneforge.engine.tiny_model import build_tiny_model_dir

        model = str(build_tiny_model_dir(work / "tiny-model"))
    train, val = write_subset(work, args.train, args.val)
    print(f"task: examples/preference, {args.train} training / {args.val} held-out pairs, {args.epochs:g} epoch(s), "
          f"model {args.model}, LoRA r16")
    print(f"{'method':<8} {'metric':<26} {'base':>9} {'trained':>9} {'steps':>6} {'time':>8} {'peak RSS':>9}")
    for name in args.methods.split(","):
        row = METHODS[name](args, model, train, val, work)
        summary = row["summary"]
        peak = max(rank["peak_memory_bytes"] for rank in summary["ranks"]) / 2**30
        for index, (metric, before, after) in enumerate(row["metrics"]):
            tail = f"{summary['steps']:>6} {summary['wall_time_s']:>7.0f}s {peak:>8.2f}G" if index == 0 else ""
            print(f"{name if index == 0 else '':<8} {metric:<26} {_fmt(before):>9} {_fmt(after):>9} {tail}")
    print(f"job directories: {work}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
