"""Per-rank memory of real 2-process DDP / FSDP runs against the memory planner's per-device estimate.

    .venv/bin/python bench/distributed_memory.py [--models tiny-llama,smollm2-135m-instruct] [--steps 2]

Each configuration runs `torchrun --nproc-per-node=2 -m tuneforge.recipes.sft` (gloo, CPU) on the example
data and reads what every rank reported in summary.json["ranks"]: the bytes of the parameters it holds
(its FSDP shard, or DDP's full replica) and of its optimizer state, counted from the tensors themselves,
and its peak resident set. The planner (tuneforge.planner.plan_job, gpu_type cpu) is asked about the
same spec. Weights and optimizer state are exact counts on both sides, so they must agree closely; the
peak RSS also holds the Python process, torch's libraries, and the whole model each rank loads before it
is sharded, which the planner (a GPU-memory model) does not count: that column is shown, not judged.
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
EXAMPLES = REPO / "examples" / "json-extraction"
MiB = 1 << 20


def run_case(model: str, adapter: str, strategy: str, steps: int, root: Path) -> dict:
    from tuneforge.planner import plan_job
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    spec = validate_job_spec({
        "model": {"base_model": model},
        "dataset": {"path": str(EXAMPLES / "train.jsonl"), "validation_path": str(EXAMPLES / "val.jsonl"),
                    "max_seq_length": 512},
        "adapter": {"type": adapter, "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-4, "packing": False},
        "resources": {"num_gpus": 2, "strategy": strategy, "gpu_type": "cpu"},
        "evaluation": {"metrics": ["loss"], "max_eval_examples": 4, "eval_before_training": False},
        "checkpoint": {"every_steps": 1000},
    })
    job_dir = root / f"{model}-{adapter}-{strategy}"
    job_dir.mkdir(parents=True)
    write_spec(job_dir, spec)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "tuneforge.recipes.sft", "--job-dir", str(job_dir), "--no-progress"],
                   env=env, check=True, capture_output=True)
    ranks = json.loads((job_dir / "summary.json").read_text())["ranks"]
    planned = plan_job(spec).memory
    return {
        "case": f"{model} {adapter} {strategy}",
        "measured_weights": max(r["parameter_bytes"] for r in ranks),
        "planned_weights": planned.weights,
        "measured_optimizer": max(r["optimizer_state_bytes"] for r in ranks),
        "planned_optimizer": planned.optimizer,
        "measured_peak_rss": max(r["peak_memory_bytes"] for r in ranks),
        "planned_total": planned.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama,smollm2-135m-instruct")
    parser.add_argument("--adapters", default="lora,full")
    parser.add_argument("--strategies", default="ddp,fsdp,deepspeed", help="deepspeed runs ZeRO-3")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TUNEFORGE_HOME", str(Path(tmp) / "home"))
        for model in args.models.split(","):
            for adapter in args.adapters.split(","):
                for strategy in args.strategies.split(","):
                    rows.append(run_case(model, adapter, strategy, args.steps, Path(tmp)))
                    r = rows[-1]
                    print(f"{r['case']:<40} weights {r['measured_weights'] / MiB:8.1f} / {r['planned_weights'] / MiB:8.1f} MiB"
                          f" = {r['measured_weights'] / r['planned_weights']:.3f}   optimizer "
                          f"{r['measured_optimizer'] / MiB:8.1f} / {r['planned_optimizer'] / MiB:8.1f} MiB"
                          f" = {r['measured_optimizer'] / max(r['planned_optimizer'], 1):.3f}   peak RSS "
                          f"{r['measured_peak_rss'] / MiB:8.0f} MiB (planner total {r['planned_total'] / MiB:.0f} MiB)",
                          flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
