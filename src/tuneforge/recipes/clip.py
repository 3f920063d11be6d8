"""CLIP fine-tuning: the symmetric contrastive loss on image-text pairs (CLIPModel(return_loss=True)), LoRA on
both towers with the projections trained whole, or full fine-tuning (the temperature too).

    python -m tuneforge.recipes.clip --job-dir DIR

The algorithm: setup (pairs, the base CLIP and its retrieval score, what trains) -> train (each micro-batch's
other pairs are its negatives, on the runtime's loop) -> save (DIR/adapter/ or DIR/model/, with the processor)
-> evaluate (held-out contrastive loss and retrieval recall@1/5/10 over every held-out pair, base vs trained).
Exit codes, resume, stops, events and the summary are the runtime's (engine/runtime).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, file_sha256, load_examples, split_indices
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult, format_metrics
from tuneforge.engine.vision.data import ImageTextPair, PairBatcher
from tuneforge.engine.vision.loss import ClipLoss
from tuneforge.engine.vision.models import load_clip, load_processor, trainable_clip
from tuneforge.evaluation.vision import clip_retrieval
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary

EVAL_BATCH = 32  # pairs per held-out loss batch (its negatives); recall@k ranks every held-out pair


@dataclass
class Setup:
    model_dir: Path
    processor: Any
    model: nn.Module  # a PEFT model over the CLIPModel, or the CLIPModel for full fine-tuning
    trainable_parameters: int
    batcher: PairBatcher
    val_batcher: PairBatcher
    schedule: object
    prepared: Prepared
    resume: ResumePoint
    data_position: dict
    recipe_state: dict = field(default_factory=dict)  # kept in checkpoints: the base metrics


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, clip, progress=progress)


def clip(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = save(job, s)
    return evaluate(job, s, training, output)


def setup(job: RecipeJob) -> Setup:
    """Pairs, the checkpoint to resume from, the base CLIP and its retrieval score, what trains, the plan."""
    spec = job.spec
    model_dir = job.base_model_dir()
    processor = load_processor(model_dir)
    batcher, val_batcher = load_pairs(job, processor, model_dir)
    job.phase("data_s")
    resume = job.resume_point()
    base = load_clip(model_dir, spec, job.precision)
    job.phase("model_load_s")
    state = {"base_metrics": base_metrics(job, base, val_batcher, resume)}
    job.phase("base_eval_s")
    model = trainable_clip(base, spec)
    model.train()
    trainable, total = parameter_counts(model)
    loss = ClipLoss(model)
    resolved = spec.model_copy(deep=True)
    resolved.dataset.format = "image_text"
    job.resolve_training(resolved, examples=len(batcher), loss_module=loss, batcher=batcher, model_dir=model_dir)
    schedule = job.schedule(len(batcher))
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps)
    cfg = job.spec.training
    data_position = {"dataset_sha256": file_sha256(spec.dataset.path), "units": len(batcher),
                     "examples_per_step": cfg.batch_size, "seed": cfg.seed}
    job.note(f"training CLIP: {trainable:,} of {total:,} parameters ({spec.adapter.type}"
             f"{', the projections whole' if spec.adapter.type != 'full' else ''}) for {schedule.total_steps} steps: "
             f"batch {cfg.batch_size} pairs (micro-batch {cfg.per_device_batch_size} x "
             f"{cfg.gradient_accumulation_steps}: each pair's negatives are its micro-batch's other pairs), learning "
             f"rate {cfg.learning_rate:g}, {cfg.num_epochs:g} epochs", kind="plan", trainable_parameters=trainable,
             total_parameters=total, total_steps=schedule.total_steps, batch_size=cfg.batch_size,
             per_device_batch_size=cfg.per_device_batch_size, learning_rate=cfg.learning_rate)
    return Setup(model_dir, processor, model, trainable, batcher, val_batcher, schedule, prepared, resume,
                 data_position, state)


def load_pairs(job: RecipeJob, processor, model_dir: Path) -> tuple[PairBatcher, PairBatcher]:
    """The training and held-out pairs (validated: every image decoded and checked), as batchers."""
    spec, cfg = job.spec, job.spec.dataset
    examples, _ = load_examples(cfg.path, "image_text")
    if cfg.validation_path:
        train, val = examples, load_examples(cfg.validation_path, "image_text")[0]
        val_dir = Path(cfg.validation_path).parent
    else:
        train_ids, val_ids = split_indices(len(examples), cfg.train_split, spec.training.seed)
        train, val, val_dir = [examples[i] for i in train_ids], [examples[i] for i in val_ids], Path(cfg.path).parent
    if len(train) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(cfg.path, 0, "too_few_examples", "", f"at least {MIN_TRAINING_EXAMPLES} training "
                                     "pairs", str(len(train)))])
    val = val[: spec.evaluation.max_eval_examples or None]
    # Captions are cut to the text tower's positions (and dataset.max_seq_length): CLIP's own truncation.
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(model_dir).text_config.max_position_embeddings
    length = min(cfg.max_seq_length, positions)

    def pairs(items):
        return [ImageTextPair(e.record["image"], e.record["text"], e.line) for e in items]

    job.note(f"dataset ready: {len(train)} training and {len(val)} held-out image-text pairs (captions up to "
             f"{length} tokens)", kind="dataset", format="image_text", train_examples=len(train),
             validation_examples=len(val))
    return (PairBatcher(pairs(train), processor, Path(cfg.path).parent, max_length=length),
            PairBatcher(pairs(val), processor, val_dir, max_length=length))


def base_metrics(job: RecipeJob, base: nn.Module, val_batcher: PairBatcher, resume: ResumePoint) -> dict:
    """The base CLIP's held-out loss and recall@k, measured once and kept across resumes."""
    if resume.path is not None or not job.spec.evaluation.eval_before_training or len(val_batcher) < 2:
        return resume.saved.get("base_metrics", {})
    metrics = _metrics(job, ClipLoss(base), val_batcher)
    job.note(f"base model: {format_metrics(metrics)}", kind="eval", model="base", step=0, metrics=metrics)
    return metrics


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop over pairs, validating every evaluation.eval_every_steps."""
    def validate():
        return _metrics(job, s.prepared.eval_module(), s.val_batcher)

    return runtime.train(job, s.prepared, s.batcher, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.recipe_state,
                         validate=validate if len(s.val_batcher) > 1 else None)


def save(job: RecipeJob, s: Setup) -> str:
    """The adapter and projections (or the whole model) with the processor."""
    return job.publish(s.model, s.processor, s.prepared, full=job.spec.adapter.type == "full")


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """Score the trained CLIP on the held-out pairs, then the summary (written last)."""
    final = _metrics(job, s.prepared.eval_module(), s.val_batcher) if len(s.val_batcher) > 1 else {}
    evaluation = Evaluation(base=EvalMetrics(**s.recipe_state["base_metrics"]), fine_tuned=EvalMetrics(**final))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def _metrics(job: RecipeJob, loss_module: nn.Module, batcher: PairBatcher) -> dict:
    return clip_retrieval(loss_module, batcher, batch_size=EVAL_BATCH, precision=job.precision)


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.clip", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
