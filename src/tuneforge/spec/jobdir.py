"""The job directory: the contract between whoever submits a job and the recipe that runs it.

DIR/spec.json           the JobSpec as submitted; written once, never changed after
DIR/resolved_spec.json  the same spec with every "auto" the recipe resolved filled in (written by the recipe)
DIR/events.jsonl        append-only event log (engine/events.py)
DIR/checkpoints/step-N/ verified checkpoints (engine/checkpoint.py)
DIR/adapter/            final PEFT adapter (LoRA / QLoRA), or DIR/model/ for full fine-tuning
DIR/export/             the deploy: export of the output with its serving descriptors (export/deploy.py)
DIR/evaluation.json     an EvaluationReport: base vs fine-tuned, intervals, example generations
DIR/output_items.jsonl  method eval: one graded item per line (spec/evals.py), written before the summary
DIR/summary.json        a JobSummary, written last, only when the job succeeded

No torch here: the API and scheduler read job directories without importing it.
The recipe process is `python -m RECIPES[spec.method] --job-dir DIR`; its exit code says what happened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from tuneforge.spec.evals import EvalRunResult
from tuneforge.spec.job import JobSpec

RECIPES = {  # a closed table: a spec names a method, never a module
    "sft": "tuneforge.recipes.sft",
    "reward": "tuneforge.recipes.reward",
    "dpo": "tuneforge.recipes.dpo",
    "ppo": "tuneforge.recipes.ppo",
    "grpo": "tuneforge.recipes.grpo",
    "vlm": "tuneforge.recipes.vlm",
    "clip": "tuneforge.recipes.clip",
    "eval": "tuneforge.recipes.eval_run",
    "export": "tuneforge.recipes.export_run",
}
EXIT_OK = 0
EXIT_FAILED = 1  # crashed or failed: worth restarting from the last checkpoint
EXIT_BAD_INPUT = 2  # the spec, the data or the hardware cannot work: restarting cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume

SPEC_FILE = "spec.json"
RESOLVED_SPEC_FILE = "resolved_spec.json"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "evaluation.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
EXPORT_DIR = "export"
ENVIRONMENT_FILE = "environment.json"  # library versions the recipe ran with (the registry's lineage)
BASE_OF_ADAPTER = "tuneforge-base.json"  # beside a registry adapter a job trains from: the base it applies to
MERGED_BASE_DIR = "base-merged"  # that adapter merged into its base, which the job then trains


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
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None  # noqa: N815 - the metric's own name
    bleu: float | None = None
    chrf: float | None = None
    exact_match: float | None = None
    token_f1: float | None = None
    accuracy: float | None = None
    json_valid: float | None = None
    json_schema: float | None = None
    # Online RL (ppo, grpo) on held-out prompts, greedy: the reward, the graders' pass rate, the KL from
    # the reference (nats per completion) and the completion length (tokens).
    mean_reward: float | None = None
    pass_rate: float | None = None
    reward_model_score: float | None = None
    kl_to_reference: float | None = None
    response_length: float | None = None
    # Preference methods, on held-out pairs. preference_*: the model's own chosen-over-rejected log-prob margin
    # (summed over completion tokens) and how often the chosen reply is the likelier one (DPO); reward_*: the
    # reward model's rewards, or DPO's implicit rewards beta * log-ratio to the reference (0 for the base).
    preference_margin: float | None = None
    preference_accuracy: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # CLIP on held-out image-text pairs: how often the matching caption (image) is among the k nearest of every
    # caption (image), the mean of both directions.
    recall_at_1: float | None = None
    recall_at_5: float | None = None
    recall_at_10: float | None = None
    graders: dict[str, float] = {}  # each evaluation.graders entry's mean score, by name
    samples: list[GenerationSample] = []

    def value(self, name: str) -> float | None:
        """A metric's or a grader's score by name."""
        if name in self.graders:
            return self.graders[name]
        return getattr(self, name, None) if name in type(self).model_fields and name not in ("graders", "samples") else None


class Evaluation(_Record):
    base: EvalMetrics = EvalMetrics()
    fine_tuned: EvalMetrics = EvalMetrics()


class BestCheckpoint(_Record):
    """The checkpoint that scored best on checkpoint.best_by during training."""

    step: int
    metric: str = "loss"
    value: float
    direction: Literal["min", "max"] = "min"

    @model_validator(mode="before")
    @classmethod
    def _before_best_by(cls, data: Any) -> Any:
        # Checkpoints and summaries written before best_by recorded {"step", "valid_loss"}.
        if isinstance(data, dict) and "valid_loss" in data and "value" not in data:
            data = {"step": data["step"], "metric": "loss", "value": data["valid_loss"], "direction": "min"}
        return data


# ---- the evaluation report (DIR/evaluation.json) ---------------------------------------------------


class MetricEstimate(_Record):
    """One model's score on one metric, with its sample size and a confidence interval."""

    value: float | None
    n: int  # examples it is measured on
    low: float | None = None
    high: float | None = None
    interval: Literal["wilson", "bootstrap"] | None = None  # how low / high were computed
    tokens: int | None = None  # likelihood metrics: the tokens they average over


class ReportRow(_Record):
    metric: str  # a metric or a grader name
    kind: Literal["likelihood", "generated", "grader"]
    higher_is_better: bool
    base: MetricEstimate | None = None
    fine_tuned: MetricEstimate | None = None

    @property
    def change(self) -> float | None:
        if self.base is None or self.fine_tuned is None or None in (self.base.value, self.fine_tuned.value):
            return None
        return self.fine_tuned.value - self.base.value


class SideBySide(_Record):
    prompt: str
    reference: str
    base: str | None = None
    fine_tuned: str | None = None


class EvaluationReport(_Record):
    """DIR/evaluation.json: base vs fine-tuned on every metric and grader, and example generations."""

    dataset: str
    examples: int
    base_model: str | None = None
    fine_tuned_model: str | None = None  # what was evaluated: a job's output, an adapter, a checkpoint
    confidence: float = 0.95
    rows: list[ReportRow] = []
    samples: list[SideBySide] = []


def write_report(job_dir: Path, report: EvaluationReport) -> None:
    write_json_atomic(job_dir / REPORT_FILE, report.model_dump(mode="json"))


def read_report(job_dir: Path) -> EvaluationReport | None:
    path = job_dir / REPORT_FILE
    try:
        return EvaluationReport.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class Deployment(_Record):
    """What deploy: did with the job's output (export/deploy.py)."""

    status: Literal["succeeded", "failed"]
    target: str
    format: str  # adapter, merged or gguf (merged also when an adapter fell back to it)
    path: str | None = None  # DIR/path holds the export and its serve.json
    command: str | None = None  # the target server's command, from serve.json
    fallback_from: list[str] | None = None  # the server rules the adapter broke, when it was merged instead
    error: str | None = None


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
    output: Literal["adapter", "model", "none"]  # DIR/output holds the result; none: an eval run (no weights)
    output_step: int | None = None  # the step whose weights are the output (checkpoint.output best: the best's)
    report: str | None = None  # DIR/report: the EvaluationReport, when the job evaluated
    train_seconds: float
    wall_time_s: float
    world_size: int
    strategy: str
    ranks: list[RankMemory]
    deployment: Deployment | None = None  # deploy: in the spec: where the export went
    eval_run: EvalRunResult | None = None  # method eval: result counts and per-criterion passes (output_items.jsonl)

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
