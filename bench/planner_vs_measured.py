"""The planner's peak-memory estimate against the measured peak of real SFT steps on this CPU machine.

    .venv/bin/python bench/planner_vs_measured.py [--models tiny-llama,smollm2-135m-instruct]
                                                  [--methods lora,qlora,full] [--steps 3] [--json OUT]

Each configuration runs tuneforge's SFT recipe (tuneforge.recipes.sft.run on a job directory whose spec.json
was written with spec.jobdir.write_spec) in its own subprocess. What is compared (docs/planner.md says why):
the process's peak RSS during the training steps (the kernel's VmHWM, reset when training starts) minus
its RSS just before the base model is loaded, against the planner's `total` (peak allocated plus the
process's non-tensor growth) for the worst micro-batch the run actually saw (its padded length and its
count of label tokens).
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
TOLERANCE = 0.25
# Per-model batch settings: the tiny model's byte-level sequences are ~3x longer than SmolLM2's.
BATCH = {"tiny-llama": 8, "smollm2-135m-instruct": 8}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def worker(job_dir: Path, result_path: Path) -> None:
    """Run the recipe in this process and record the memory it takes for the training steps."""
    import torch
    import torch.nn.functional as F

    # Everything the recipe imports lazily while it loads the model is imported (and the CPU kernels'
    # first-use buffers are created) before the baseline, so the baseline is the process minus the model.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    layer = torch.nn.Linear(64, 64)
    x = torch.randn(4, 8, 64, requires_grad=True)
    q = layer(x).view(4, 8, 4, 16).transpose(1, 2)
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    import tuneforge.engine.runtime.job as runtime_job
    import tuneforge.recipes.sft as sft

    record = {"batches": []}
    original_collate = sft.Batcher.collate

    def observed_collate(self, unit_ids):
        batch = original_collate(self, unit_ids)
        rows, length = batch["input_ids"].shape
        record["batches"].append({"rows": rows, "length": length,
                                  "label_tokens": int((batch["labels"][:, 1:] != -100).sum())})
        return batch

    class ObservedEvents(runtime_job.EventReporter):
        def emit(self, message, **data):
            kind = data.get("kind")
            if kind == "dataset":  # tokenized; the base model is loaded next
                record["rss_before_model"] = _rss_bytes()
            elif kind == "plan":  # model, adapter and optimizer built; the training loop starts
                record["rss_model_ready"] = _rss_bytes()
                record["trainable_parameters"] = data.get("trainable_parameters")
                _reset_hwm()
            return super().emit(message, **data)

        def metrics(self, message, **data):
            result = super().metrics(message, **data)
            if data.get("step") == data.get("total_steps") and "train_loss" in data:
                record["peak_rss_training"] = _hwm_bytes()
                record["train_loss"] = data["train_loss"]
                result_path.write_text(json.dumps(record))
                os._exit(0)  # the final checkpoint and evaluation are not part of what is measured
            return result

    sft.Batcher.collate = observed_collate
    runtime_job.EventReporter = ObservedEvents  # the recipe runtime writes every event
    sft.run(job_dir, progress=False)
    raise SystemExit("the recipe ended without reporting its final step")


def write_job(directory: Path, model: str, method: str, steps: int) -> Path:
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    spec = validate_job_spec({
        "model": {"base_model": model},
        "dataset": {"path": str(EXAMPLES / "train.jsonl"), "max_seq_length": 512, "train_split": 1.0},
        "adapter": {"type": method, "rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"learning_rate": 1e-4, "per_device_batch_size": BATCH[model], "max_steps": steps,
                     "precision": "fp32", "optimizer": "adamw", "seed": 0},
        "evaluation": {"eval_before_training": False, "metrics": ["loss"]},
        "checkpoint": {"every_steps": None, "every_minutes": None},
    })
    job_dir = directory / f"{model}-{method}"
    job_dir.mkdir(parents=True)
    write_spec(job_dir, spec)
    return job_dir


def planner_estimate(model: str, method: str, batches: list[dict]) -> tuple[int, dict]:
    """The planner's peak for the worst micro-batch the run saw, and that batch."""
    from tuneforge.planner import TrainingSetup, estimate_memory, load_model_arch

    arch = load_model_arch(model)
    best, worst = -1.0, None
    for batch in batches:
        positions = batch["rows"] * (batch["length"] - 1)
        setup = TrainingSetup(
            method=method, gpu="cpu", precision="fp32", optimizer="adamw", seq_len=batch["length"],
            micro_batch=batch["rows"], loss_fraction=min(1.0, max(batch["label_tokens"], 1) / positions),
            lora_rank=16, lora_dropout=0.05,
        )
        peak = estimate_memory(arch, setup).total  # on CPU: peak allocated + the process's non-tensor growth
        if peak > best:
            best, worst = peak, batch
    return int(best), worst


def measure(model: str, method: str, steps: int, scratch: Path) -> dict:
    job_dir = write_job(scratch, model, method, steps)
    result_path = job_dir / "memory.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    # A fixed mmap threshold stops glibc from keeping freed large blocks on its heap, so RSS follows the
    # memory the process holds instead of the most it ever held.
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job_dir), str(result_path)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"{model} {method}: the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(result_path.read_text())
    measured = record["peak_rss_training"] - record["rss_before_model"]
    estimate, worst = planner_estimate(model, method, record["batches"])
    return {
        "model": model, "method": method, "steps": steps,
        "measured_bytes": measured, "estimate_bytes": estimate,
        "error": (estimate - measured) / measured,
        "model_ready_bytes": record["rss_model_ready"] - record["rss_before_model"],
        "worst_batch": worst, "batches": record["batches"], "trainable_parameters": record.get("trainable_parameters"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("JOB_DIR", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny-llama,smollm2-135m-instruct")
    parser.add_argument("--methods", default="lora,qlora,full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0

    results = []
    print(f"{'model':<24}{'method':<7}{'batch (rows x len)':>19}{'measured MiB':>14}{'planner MiB':>13}{'error':>8}")
    with tempfile.TemporaryDirectory(prefix="planner-bench-") as scratch:
        for model in args.models.split(","):
            for method in args.methods.split(","):
                row = measure(model, method, args.steps, Path(scratch))
                results.append(row)
                shape = f"{row['worst_batch']['rows']} x {row['worst_batch']['length']}"
                print(f"{model:<24}{method:<7}{shape:>19}{row['measured_bytes'] / MiB:>14.1f}"
                      f"{row['estimate_bytes'] / MiB:>13.1f}{row['error']:>+8.1%}", flush=True)
    misses = [r for r in results if abs(r["error"]) > TOLERANCE]
    print(f"{len(results) - len(misses)} of {len(results)} within {TOLERANCE:.0%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
