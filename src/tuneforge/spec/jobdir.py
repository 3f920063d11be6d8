"""The job directory: the contract between whoever submits a job and the recipe that runs it.

DIR/spec.json           the resolved JobSpec (written by the submitter, updated by the recipe when it
                        resolves "auto" values)
DIR/events.jsonl        append-only event log (engine/events.py)
DIR/checkpoints/step-N/ verified checkpoints (engine/checkpoint.py)
DIR/adapter/            final PEFT adapter (LoRA / QLoRA), or DIR/model/ for full fine-tuning
DIR/summary.json        written last, only when the job succeeded

Only stdlib here: the API and scheduler read job directories without importing torch.

The recipe process is `python -m RECIPES[spec.method] --job-dir DIR`; its exit code says what happened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuneforge.spec.job import JobSpec

RECIPES = {"sft": "tuneforge.recipes.sft"}  # a closed table: a spec names a method, never a module
EXIT_OK = 0
EXIT_FAILED = 1  # crashed or failed: worth restarting from the last checkpoint
EXIT_BAD_INPUT = 2  # the spec, the data or the hardware cannot work: restarting cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def write_spec(job_dir: Path, spec: JobSpec) -> None:
    write_json_atomic(job_dir / SPEC_FILE, spec.model_dump(mode="json"))


def read_spec(job_dir: Path) -> JobSpec:
    return JobSpec.model_validate_json((job_dir / SPEC_FILE).read_text(encoding="utf-8"))


def read_summary(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
