"""The job directory: the contract between whoever submits a job and the recipe that runs it.

DIR/spec.json           the JobSpec as submitted; written once, never changed after
DIR/resolved_spec.json  the same spec with every "auto" the recipe resolved filled in (written by the recipe)
DIR/events.jsonl        append-only event log (engine/events.py)
DIR/checkpoints/step-N/ verified checkpoints (engine/checkpoint.py)
DIR/adapter/            final PEFT adapter (LoRA / QLoRA), or DIR/model/ for full fine-tuning
DIR/summary.json        a JobSummary, written last, only when the job succeeded

No torch here: the API and scheduler read job directories without importing it.
The recipe process is `python -m RECIPES[spec.method] --job-dir DIR`; its exit code says what happened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tuneforge.spec.job import JobSpec

RECIPES = {  # a closed table: a spec names a method, never a module
    "sft": "tuneforge.recipes.sft",
    "reward": "tuneforge.recipes.reward",
    "dpo": "tuneforge.recipes.dpo",
    "ppo": "tuneforge.recipes.ppo",
    "grpo": "tuneforge.recipes.grpo",
}
EXIT_OK = 0
EXIT_FAILED = 1  # crashed or failed: worth restarting from the last checkpoint
EXIT_BAD_INPUT = 2  # the spec, the data or the hardware cannot work: restarting cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume

SPEC_FILE = "spec.json"
RESOLVED_SPEC_FILE = "resolved_spec.json"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class SpecChanged(FileExistsError):
    """spec.json exists and holds another job: a submitted spec is never rewritten."""


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
    """Write spec.json when the job is submitted. It never changes after: writing the same spec again
    is a no-op, another one raises SpecChanged (what a run resolved goes to resolved_spec.json)."""
    path = job_dir / SPEC_FILE
    if path.exists():
        if read_spec(job_dir) != spec:
            raise SpecChanged(f"{path} holds another job's spec; a submitted spec is never rewritten")
        return
    write_json_atomic(path, spec.model_dump(mode="json"))


def read_spec(job_dir: Path) -> JobSpec:
    return JobSpec.model_validate_json((job_dir / SPEC_FILE).read_text(encoding="utf-8"))


def write_resolved_spec(job_dir: Path, spec: JobSpec) -> None:
    write_json_atomic(job_dir / RESOLVED_SPEC_FILE, spec.model_dump(mode="json"))


def read_resolved_spec(job_dir: Path) -> dict[str, Any] | None:
    """resolved_spec.json as JSON, or None before the recipe wrote it. Read it section by section
    (TrainingSpec.model_validate(resolved["training"])): resolved micro-batches need not divide the
    per-device batch (the last micro-batch of a step is smaller), which a submitted spec may not say."""
    path = job_dir / RESOLVED_SPEC_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return value if isinstance(value, dict) else None


# ---- the summary ----------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSample(_Record):
    prompt: str
    reference: str
    prediction: str


class EvalMetrics(_Record):
    """One model's scores on the validation set; None where the job did not measure it."""

    loss: float | None = None
    token_accuracy: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    samples: list[GenerationSample] = []


class Evaluation(_Record):
    base: EvalMetrics = EvalMetrics()
    fine_tuned: EvalMetrics = EvalMetrics()


class BestCheckpoint(_Record):
    step: int
    valid_loss: float


class RankMemory(_Record):
    """What one training process held (FSDP's shards, DDP's replicas), checked against the planner."""

    rank: int
    parameters: int
    parameter_bytes: int
    trainable_parameters: int
    optimizer_state_bytes: int
    peak_memory_bytes: int


class JobSummary(_Record):
    """DIR/summary.json: what a succeeded job did and how well, written last by rank 0."""

    status: Literal["succeeded"] = "succeeded"
    method: str
    adapter: Literal["lora", "qlora", "full"]
    base_model: str
    device: str
    precision: str
    steps: int
    epochs: float
    train_loss: float | None
    train_loss_last_10_mean: float | None
    tokens_seen: int
    trained_tokens: int  # the units the loss counted: label tokens for causal-LM losses
    trainable_parameters: int
    eval: Evaluation
    best_checkpoint: BestCheckpoint | None = None
    output: Literal["adapter", "model"]  # DIR/output holds the result
    train_seconds: float
    wall_time_s: float
    world_size: int
    strategy: str
    ranks: list[RankMemory]

    def scalars(self) -> dict[str, Any]:
        """The one-line facts, for the final event."""
        return self.model_dump(mode="json", exclude={"eval", "ranks", "best_checkpoint"})


def write_summary(job_dir: Path, summary: JobSummary) -> None:
    write_json_atomic(job_dir / SUMMARY_FILE, summary.model_dump(mode="json"))


def read_summary(job_dir: Path) -> JobSummary | None:
    """The job's summary, or None when it has none (it has not succeeded). Raises pydantic's
    ValidationError for a summary that is not one."""
    path = job_dir / SUMMARY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return JobSummary.model_validate_json(text)
