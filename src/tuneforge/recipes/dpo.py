"""Direct preference optimization: raise the chosen reply's likelihood over the rejected one's, relative to
the base model, on preference pairs (prompt, chosen, rejected). LoRA, QLoRA or full fine-tuning.

    python -m tuneforge.recipes.dpo --job-dir DIR

The algorithm: setup (pairs, the model to train, its reference, the base model's score) -> train (DPO's
loss, or another of TRL's pairwise losses, on the runtime's loop) -> save -> evaluate (held-out log-prob
margin and preference accuracy, base vs fine-tuned). The reference is the base itself: with an adapter,
the same weights with the adapter disabled; for full fine-tuning, log-probs of the initial weights
computed once and kept in every checkpoint. Exit codes, resume, stops, events and the summary are the
runtime's (engine/runtime).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.data.loading import file_sha256
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts, trainable_model
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.model_loading import load_base_model
from tuneforge.engine.preference import DpoLoss, PairBatcher, dpo_metrics, per_pair, reference_table
from tuneforge.engine.preference.data import PreferenceData, load_preference_data
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult, format_metrics, scalar_metrics
from tuneforge.evaluation.runner import eval_metrics
from tuneforge.spec.jobdir import Evaluation, JobSummary

EVAL_BATCH = 8  # pairs per evaluation pass
LIKELIHOOD = ("loss", "perplexity")  # measured from the pairs' log-probs; the other metrics from generated answers


@dataclass
class Setup:
    data: PreferenceData
    model: nn.Module  # a PEFT model, or the base model itself for full fine-tuning
    trainable_parameters: int
    batcher: PairBatcher
    val_batcher: PairBatcher
    schedule: object
    prepared: Prepared
    resume: ResumePoint
    data_position: dict
    recipe_state: dict = field(default_factory=dict)  # kept in checkpoints: base metrics, precomputed reference


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, dpo, progress=progress)


def dpo(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = save(job, s)
    return evaluate(job, s, training, output)


# ---- setup ---------------------------------------------------------------------------------------


def setup(job: RecipeJob) -> Setup:
    """Pairs, the checkpoint to resume from, the model and its reference, the base score, the plan."""
    spec = job.spec
    reference = resolve_reference(spec)
    data = load_preference_data(job, max_prompt_length=spec.dpo.max_prompt_length)
    job.phase("data_s")
    resume = job.resume_point()
    base = load_base_model(data.model_dir, spec.model, job.precision, full_finetune=spec.adapter.type == "full")
    job.phase("model_load_s")
    model = trainable_model(base, spec)
    model.train()
    trainable, total = parameter_counts(model)
    loss = DpoLoss(model, spec.dpo, reference=reference)
    pad = data.tokenizer.pad_token_id
    batcher, val_batcher = PairBatcher(data.train, pad), PairBatcher(data.val, pad)
    state = {}
    if reference == "precomputed":  # before any step and before sharding: the initial weights, whole
        state["reference_logps"] = precomputed_reference(job, loss, batcher, val_batcher, resume)
    resolved = spec.model_copy(deep=True)
    resolved.dataset.format, resolved.dataset.prompt_template = "preference", data.renderer.template
    resolved.dpo.reference = reference
    job.resolve_training(resolved, examples=len(data.train), loss_module=loss, batcher=batcher,
                         model_dir=data.model_dir)
    schedule = job.schedule(len(batcher))
    state["base_metrics"] = base_metrics(job, data, model, loss, val_batcher, resume)
    job.phase("base_eval_s")
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps)
    cfg = job.spec.training
    data_position = {"dataset_sha256": file_sha256(spec.dataset.path), "units": len(batcher),
                     "examples_per_step": cfg.batch_size, "seed": cfg.seed}
    describe_plan(job, schedule, trainable, total, reference)
    return Setup(data, model, trainable, batcher, val_batcher, schedule, prepared, resume, data_position, state)


def resolve_reference(spec) -> str:
    """dpo.reference for this job: auto is the adapter disabled with an adapter, precomputed without one."""
    reference = spec.dpo.reference
    if reference == "auto":
        reference = "precomputed" if spec.adapter.type == "full" else "adapter_disabled"
    return reference  # JobSpec refuses adapter_disabled for full fine-tuning


def describe_plan(job: RecipeJob, schedule, trainable: int, total: int, reference: str) -> None:
    spec, cfg = job.spec, job.spec.training
    job.note(f"training {trainable:,} of {total:,} parameters ({spec.adapter.type}) with DPO ({spec.dpo.loss_type}, "
             f"beta {spec.dpo.beta:g}, reference {reference}) for {schedule.total_steps} steps: batch {cfg.batch_size} "
             f"pairs (micro-batch {cfg.per_device_batch_size} x {cfg.gradient_accumulation_steps}), learning rate "
             f"{cfg.learning_rate:g}, {cfg.num_epochs:g} epochs", kind="plan", trainable_parameters=trainable,
             total_parameters=total, total_steps=schedule.total_steps, batch_size=cfg.batch_size,
             per_device_batch_size=cfg.per_device_batch_size, learning_rate=cfg.learning_rate, reference=reference)


def precomputed_reference(job: RecipeJob, loss: DpoLoss, batcher: PairBatcher, val_batcher: PairBatcher,
                          resume: ResumePoint) -> dict:
    """The reference log-probs of every pair, computed once by a fresh run (a resumed run takes the saved
    ones: the weights it loads are no longer the initial ones), attached to both batchers."""
    saved = resume.saved.get("reference_logps")
    if saved is None:
        tables = {name: reference_table(loss, b, batch_size=EVAL_BATCH, precision=job.precision, parallel=job.parallel)
                  for name, b in (("train", batcher), ("validation", val_batcher))}
        job.note(f"reference log-probs of {len(batcher) + len(val_batcher)} pairs computed from the initial weights",
                 kind="reference", pairs=len(batcher) + len(val_batcher))
        saved = {name: table.tolist() for name, table in tables.items()}
    batcher.reference = torch.tensor(saved["train"], dtype=torch.float32).reshape(-1, 2)
    val_batcher.reference = torch.tensor(saved["validation"], dtype=torch.float32).reshape(-1, 2)
    return saved


def base_metrics(job: RecipeJob, data: PreferenceData, model: nn.Module, loss: DpoLoss, val_batcher: PairBatcher,
                 resume: ResumePoint) -> dict:
    """The base model's held-out scores (before any step the policy is the base: LoRA starts at zero),
    measured once and kept across resumes."""
    if resume.path is not None or not job.spec.evaluation.eval_before_training or not data.val:
        return resume.saved.get("base_metrics", {})
    metrics = scalar_metrics(_metrics(job, data, model, loss, val_batcher), keep_samples=True)
    job.note(f"base model: {format_metrics(metrics)}", kind="eval", model="base", step=0,
             metrics=scalar_metrics(metrics))
    return metrics


# ---- train, save, evaluate -----------------------------------------------------------------------


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop over pairs, validating every evaluation.eval_every_steps."""
    def validate():
        return scalar_metrics(_metrics(job, s.data, s.model, s.prepared.eval_module(), s.val_batcher, generate=False))

    return runtime.train(job, s.prepared, s.batcher, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.recipe_state,
                         validate=validate if s.data.val else None)


def save(job: RecipeJob, s: Setup) -> str:
    """The final adapter (or model), gathered from the shards, where users and servers load it."""
    return job.publish(s.model, s.data.tokenizer, s.prepared, full=job.spec.adapter.type == "full")


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """Score the fine-tuned model on the held-out pairs, then the summary (written last)."""
    final = {}
    if s.data.val:
        final = scalar_metrics(_metrics(job, s.data, s.model, s.prepared.eval_module(), s.val_batcher),
                               keep_samples=True)
    spec = job.spec.evaluation
    evaluation = Evaluation(base=eval_metrics(s.recipe_state["base_metrics"], spec), fine_tuned=eval_metrics(final, spec))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def _metrics(job: RecipeJob, data: PreferenceData, model: nn.Module, module: nn.Module, batcher: PairBatcher, *,
             generate: bool = True) -> dict:
    """Held-out pair scores (dpo_metrics: loss, margins, accuracies; perplexity when asked) and, when asked,
    generated metrics of greedy answers against the chosen replies."""
    spec_metrics = job.spec.evaluation.metrics
    values = per_pair(lambda batch: module(**batch, per_pair=True), batcher, module=module, batch_size=EVAL_BATCH,
                      precision=job.precision, parallel=job.parallel)
    metrics = dpo_metrics(values)
    if "perplexity" not in spec_metrics:
        metrics.pop("perplexity", None)
    generated = [m for m in spec_metrics if m not in LIKELIHOOD]
    if generate and generated and data.val_examples:
        from tuneforge.evaluation.runner import evaluate as run_metrics

        answers = run_metrics(model, module, data.tokenizer, data.renderer, data.val_examples, [],
                              job.spec.evaluation.model_copy(update={"metrics": generated}), batch_size=EVAL_BATCH,
                              precision=job.precision, parallel=job.parallel)
        metrics.update(answers)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.dpo", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
