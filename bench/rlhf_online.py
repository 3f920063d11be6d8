"""Online RL on the project's answer-format task: PPO and GRPO, before/after held-out reward, pass rate and
KL to the reference, with the time and peak memory of each job.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rlhf_online.py             # the tiny model (seconds per job)
    .venv/bin/python bench/rlhf_online.py --model smollm2-135m-instruct --steps 20 [--methods grpo]

Each method runs as its recipe does in production (`python -m tuneforge.recipes.ppo|grpo --job-dir DIR`,
a fresh process, so its peak RSS is its own), from configs/ppo and configs/grpo with these changes:
`--steps` steps, and for the tiny model (a 2-layer Llama with a byte tokenizer, random weights: it cannot
write "Answer:" by chance) a reward it finds by chance in about 1 sample in 20, the reply containing the
letter "a", at a learning rate a random model needs. The prompts are examples/rl's either way. Greedy
decoding on the 24 held-out prompts; KL in nats per completion (exact per position, summed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASK = REPO / "examples" / "rl"
LETTER_A = {"type": "string_check", "name": "letter_a", "input": "{{sample.output_text}}", "reference": "a",
            "operation": "like"}


def spec_for(method: str, model: str, steps: int, workdir: Path) -> dict:
    from tuneforge.spec import load_job_spec

    spec = load_job_spec(REPO / "configs" / method / "smollm2-135m-lora.yaml").model_dump(mode="json")
    spec["dataset"].update(path=str(TASK / "prompts.jsonl"), validation_path=str(TASK / "held_out.jsonl"))
    spec["training"]["max_steps"] = steps
    spec["checkpoint"]["every_steps"] = None
    if model == "tiny":
        from tuneforge.engine.tiny_model import build_tiny_model_dir

        tiny = workdir / "tiny-llama"
        if not tiny.exists():
            build_tiny_model_dir(tiny)
        spec["model"]["base_model"] = str(tiny)
        spec["training"]["learning_rate"] = 2e-2
        spec["rollout"].update(graders=[LETTER_A], max_new_tokens=16)
        spec["evaluation"]["max_new_tokens"] = 16
    else:
        spec["model"]["base_model"] = model
    return spec


def run(method: str, model: str, steps: int, workdir: Path) -> dict:
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import read_summary, write_spec

    job_dir = workdir / f"{method}-job"
    job_dir.mkdir()
    write_spec(job_dir, validate_job_spec(spec_for(method, model, steps, workdir)))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", f"tuneforge.recipes.{method}", "--job-dir", str(job_dir),
                             "--no-progress"], cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{method} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = read_summary(job_dir)
    return {"method": method, "seconds": seconds, "train_seconds": summary.train_seconds,
            "peak_rss_gb": max(r.peak_memory_bytes for r in summary.ranks) / 1e9,
            "base": summary.eval.base, "tuned": summary.eval.fine_tuned, "steps": summary.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default) or smollm2-135m-instruct or a model directory")
    parser.add_argument("--steps", type=int, default=None, help="steps per method (tiny: 30, else 20)")
    parser.add_argument("--methods", default="ppo,grpo")
    args = parser.parse_args()
    steps = args.steps or (30 if args.model == "tiny" else 20)
    with tempfile.TemporaryDirectory(prefix="tuneforge-rl-bench-") as tmp:
        os.environ.setdefault("TUNEFORGE_HOME", str(Path(tmp) / "home"))
        rows = [run(method, args.model, steps, Path(tmp)) for method in args.methods.split(",")]
    held_out = len((TASK / "held_out.jsonl").read_text().splitlines())
    print(f"model {args.model}, {steps} steps per method, greedy on {held_out} held-out prompts")
    print(f"{'method':6} {'reward before':>13} {'after':>6} {'pass before':>11} {'after':>6} {'KL after':>8} "
          f"{'length':>6} {'job s':>6} {'train s':>7} {'peak RSS':>8}")
    for r in rows:
        b, t = r["base"], r["tuned"]
        print(f"{r['method']:6} {b.mean_reward:13.3f} {t.mean_reward:6.3f} {b.pass_rate:11.3f} {t.pass_rate:6.3f} "
              f"{t.kl_to_reference:8.3f} {t.response_length:6.1f} {r['seconds']:6.0f} {r['train_seconds']:7.0f} "
              f"{r['peak_rss_gb']:6.2f} GB")


if __name__ == "__main__":
    main()
