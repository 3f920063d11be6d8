"""The cost of monitoring on training: the same short SFT run on the tiny model with monitoring off
(no system sampling, no alerts) and on (sampling every --interval seconds, the default alerts, optionally
a TensorBoard reporter), interleaved off/on --repeats times; prints each run's training seconds (the
time inside optimizer steps, summary.train_seconds) and the ratio of the medians, on/off.

    OMP_NUM_THREADS=1 .venv/bin/python bench/monitoring_overhead.py [--steps 40] [--repeats 3] [--interval 0.5]
        [--tensorboard]

A ratio is meaningful only from one invocation on a quiet machine (other processes change both sides
unevenly); the sampler's share is small by design, so expect a ratio within noise of 1.00.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_job_dir  # noqa: E402

from tuneforge.engine.tiny_model import build_tiny_model_dir  # noqa: E402
from tuneforge.recipes import sft  # noqa: E402

OFF_ALERTS = {name: {"enabled": False} for name in
              ("loss_nan", "loss_divergence", "throughput_drop", "no_progress", "eval_worse")}


def run(root: Path, model_dir: Path, name: str, steps: int, monitoring: dict) -> float:
    job_dir = make_job_dir(root / name, model_dir, training={"max_steps": steps, "per_device_batch_size": 4},
                           evaluation={"metrics": ["loss"], "max_eval_examples": 4, "eval_before_training": False},
                           checkpoint={"every_steps": 10_000}, monitoring=monitoring)
    return sft.run(job_dir, progress=False).train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5, help="sample_interval_s when on")
    parser.add_argument("--tensorboard", action="store_true", help="also run the TensorBoard reporter when on")
    args = parser.parse_args()
    off = {"sample_interval_s": None, "alerts": OFF_ALERTS}
    on = {"sample_interval_s": args.interval, "peak_flops": 1e11,
          "reporters": ["tensorboard"] if args.tensorboard else []}
    timings: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-monitoring-") as scratch:
        root = Path(scratch)
        model_dir = build_tiny_model_dir(root / "model")
        run(root, model_dir, "warmup", 4, off)  # imports, kernels and page cache, counted on neither side
        for repeat in range(args.repeats):
            for label, monitoring in (("off", off), ("on", on)):
                seconds = run(root, model_dir, f"{label}-{repeat}", args.steps, monitoring)
                timings[label].append(seconds)
                print(f"{label:>3} run {repeat + 1}: {seconds:.2f} s for {args.steps} steps", flush=True)
    off_s, on_s = statistics.median(timings["off"]), statistics.median(timings["on"])
    print(f"median training seconds: off {off_s:.2f}, on {on_s:.2f} (sampling every {args.interval:g} s"
          f"{', tensorboard' if args.tensorboard else ''}); ratio on/off {on_s / off_s:.3f}")


if __name__ == "__main__":
    main()
