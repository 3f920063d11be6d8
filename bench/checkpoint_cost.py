"""What checkpoints cost on SmolLM2-135M: save / restore time and size, adapter-only vs full, and the
training-time overhead of checkpointing every N steps, as a percentage of an uninterrupted run.

    .venv/bin/python bench/checkpoint_cost.py [--steps 30] [--every 10]

Part 1 times tuneforge's own save (staging dir, fsync, sha256 manifest, rename) and restore (verify +
load) for a LoRA checkpoint and a full fine-tuning checkpoint (weights + AdamW state).
Part 2 runs the SFT recipe twice on the same data, without periodic checkpoints and with one every N
steps, alternating, and compares their train_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def save_restore(adapter_type: str, workdir: Path) -> dict:
    from tuneforge.data.batching import collate
    from tuneforge.engine.adapters import make_trainable
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.checkpoint import checkpoint_bytes, restore_training_checkpoint, save_training_checkpoint, verify_checkpoint
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.model_loading import load_base_model
    from tuneforge.engine.optim import build_optimizer, build_scheduler
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.train_step import optimizer_step
    from tuneforge.data.templating import TokenizedExample
    from tuneforge.spec.job import AdapterSpec, ModelSpec, TrainingSpec

    precision = resolve_precision("fp32", torch.device("cpu"))
    model_dir = resolve_base_model("smollm2-135m-instruct")
    model = load_base_model(model_dir, ModelSpec(), precision, full_finetune=adapter_type == "full")
    model = make_trainable(model, AdapterSpec(type=adapter_type), quantized=False, gradient_checkpointing=False)
    training = TrainingSpec()
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training, 10)
    ids = list(range(100, 164))
    batch = collate([TokenizedExample(ids, ids, 1)], pad_id=2)
    optimizer_step(CausalLMLoss(model), [batch], optimizer=optimizer, scheduler=scheduler, scaler=None,
                   precision=precision, max_grad_norm=1.0, parameters=[p for p in model.parameters() if p.requires_grad])
    root = workdir / adapter_type
    started = time.perf_counter()
    path = save_training_checkpoint(root, 1, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                                    trainer_state={"metrics": {}})
    saved = time.perf_counter() - started
    started = time.perf_counter()
    assert verify_checkpoint(path) is None
    restore_training_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None)
    restored = time.perf_counter() - started
    size = checkpoint_bytes(path)
    shutil.rmtree(root)
    return {"type": adapter_type, "bytes": size, "save_s": saved, "restore_s": restored}


def recipe_run(workdir: Path, name: str, steps: int, every: int | None) -> dict:
    from conftest import EXAMPLE_DATA
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    job_dir = workdir / name
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    spec = validate_job_spec({
        "model": {"base_model": "smollm2-135m-instruct"},
        "dataset": {"path": str(EXAMPLE_DATA / "train.jsonl"), "validation_path": str(EXAMPLE_DATA / "val.jsonl"),
                    "max_seq_length": 512},
        "training": {"max_steps": steps, "per_device_batch_size": 8},
        "evaluation": {"metrics": ["loss"], "eval_before_training": False, "max_eval_examples": 8},
        "checkpoint": {"every_steps": every, "every_minutes": None, "keep_last": 2},
    })
    write_spec(job_dir, spec)
    subprocess.run([sys.executable, "-m", "tuneforge.recipes.sft", "--job-dir", str(job_dir), "--no-progress"],
                   check=True, env=os.environ.copy())
    summary = json.loads((job_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    periodic = [e for e in events if e["data"].get("kind") == "checkpoint" and e["data"]["step"] < steps]
    return {"train_seconds": summary["train_seconds"], "periodic_checkpoints": len(periodic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from tuneforge.engine.quiet import quiet_libraries

    quiet_libraries()
    workdir = Path(tempfile.mkdtemp(prefix="tuneforge-bench-ckpt-"))
    os.environ.setdefault("TUNEFORGE_HOME", str(Path.home() / ".tuneforge"))
    try:
        print("checkpoint save / restore, SmolLM2-135M (fp32, CPU):")
        print(f"  {'type':6} {'size':>10} {'save':>8} {'restore':>8}")
        results = {}
        for adapter_type in ("lora", "full"):
            r = results[adapter_type] = save_restore(adapter_type, workdir)
            print(f"  {r['type']:6} {r['bytes'] / 2**20:8.1f}MB {r['save_s']:7.2f}s {r['restore_s']:7.2f}s")
        print(f"  full / lora: size {results['full']['bytes'] / results['lora']['bytes']:.0f}x, "
              f"save {results['full']['save_s'] / results['lora']['save_s']:.0f}x")

        print(f"\ntraining-time overhead, LoRA, {args.steps} steps, checkpoint every {args.every} steps vs none "
              f"({args.rounds} alternating rounds):")
        plain, checkpointed = [], []
        for _ in range(args.rounds):
            plain.append(recipe_run(workdir, "plain", args.steps, None)["train_seconds"])
            run = recipe_run(workdir, "ckpt", args.steps, args.every)
            checkpointed.append(run["train_seconds"])
        base, with_ckpt = min(plain), min(checkpointed)
        step_s = base / args.steps
        print(f"  without: {base:.1f}s  with: {with_ckpt:.1f}s  ({run['periodic_checkpoints']} periodic checkpoints)")
        print(f"  overhead every {args.every} steps: {100 * (with_ckpt - base) / base:+.1f}%")
        per_save = results["lora"]["save_s"]
        print(f"  at the default interval (every 30 min): {100 * per_save / 1800:.3f}% "
              f"(one {per_save:.2f}s save per 1800s; a step here takes {step_s:.2f}s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
