"""Reward model: a scalar head on the base, trained on preference pairs to score the chosen reply above the
rejected one (Bradley-Terry). LoRA (the head trained whole beside the adapter), QLoRA or full fine-tuning.

    python -m tuneforge.recipes.reward --job-dir DIR

The algorithm: setup (pairs, the base with a fresh head, its score) -> train (-log sigmoid(r_chosen -
r_rejected), + center_rewards_coefficient * (r_chosen + r_rejected)^2, on the runtime's loop) -> save
(DIR/adapter/ or DIR/model/ with reward_model.json: what PPO, GRPO and judges load with
engine.preference.load_reward_model) -> evaluate (held-out pair accuracy and mean reward margin, base
vs trained). Exit codes, resume, stops, events and the summary are the runtime's (engine/runtime).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tuneforge.data.loading import file_sha256
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts, trainable_model
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.preference import (
    PairBatcher,
    RewardLoss,
    head_in_float32,
    load_reward_base,
    per_pair,
    reward_metrics,
    write_manifest,
)
from tuneforge.engine.preference.data import PreferenceData, load_preference_data
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult, format_metrics
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, JobSummary

EVAL_BATCH = 8  # pairs per evaluation pass


@dataclass
class Setup:
    data: PreferenceData
    model: nn.Module  # the sequence-classification model (a PEFT model over it with an adapter)
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
    return runtime.run_recipe(job_dir, reward, progress=progress)


def reward(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = save(job, s)
    return evaluate(job, s, training, output)


def setup(job: RecipeJob) -> Setup:
    """Pairs, the checkpoint to resume from, the base with a scalar head and its score, the plan."""
    spec = job.spec
    data = load_preference_data(job, need_labels=False)
    job.phase("data_s")
    resume = job.resume_point()
    base = load_reward_base(data.model_dir, spec.model, job.precision, full_finetune=spec.adapter.type == "full",
                            pad_token_id=data.tokenizer.pad_token_id)
    job.phase("model_load_s")
    model = trainable_model(base, spec, task_type="SEQ_CLS")
    head_in_float32(model)
    model.train()
    trainable, total = parameter_counts(model)
    loss = RewardLoss(model, spec.reward.center_rewards_coefficient)
    pad = data.tokenizer.pad_token_id
    batcher, val_batcher = PairBatcher(data.train, pad, labels=False), PairBatcher(data.val, pad, labels=False)
    resolved = spec.model_copy(deep=True)
    resolved.dataset.format, resolved.dataset.prompt_template = "preference", data.renderer.template
    job.resolve_training(resolved, examples=len(data.train), loss_module=loss, batcher=batcher,
                         model_dir=data.model_dir)
    schedule = job.schedule(len(batcher))
    state = {"base_metrics": base_metrics(job, data, loss, val_batcher, resume)}
    job.phase("base_eval_s")
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps)
    cfg = job.spec.training
    data_position = {"dataset_sha256": file_sha256(spec.dataset.path), "units": len(batcher),
                     "examples_per_step": cfg.batch_size, "seed": cfg.seed}
    job.note(f"training a reward model: {trainable:,} of {total:,} parameters ({spec.adapter.type}, the head whole) "
             f"for {schedule.total_steps} steps: batch {cfg.batch_size} pairs (micro-batch "
             f"{cfg.per_device_batch_size} x {cfg.gradient_accumulation_steps}), learning rate {cfg.learning_rate:g}, "
             f"{cfg.num_epochs:g} epochs", kind="plan", trainable_parameters=trainable, total_parameters=total,
             total_steps=schedule.total_steps, batch_size=cfg.batch_size,
             per_device_batch_size=cfg.per_device_batch_size, learning_rate=cfg.learning_rate)
    return Setup(data, model, trainable, batcher, val_batcher, schedule, prepared, resume, data_position, state)


def base_metrics(job: RecipeJob, data: PreferenceData, loss: RewardLoss, val_batcher: PairBatcher,
                 resume: ResumePoint) -> dict:
    """The untrained head's held-out scores (about chance), measured once and kept across resumes."""
    if resume.path is not None or not job.spec.evaluation.eval_before_training or not data.val:
        return resume.saved.get("base_metrics", {})
    metrics = _metrics(job, loss, val_batcher)
    job.note(f"base model: {format_metrics(metrics)}", kind="eval", model="base", step=0, metrics=metrics)
    return metrics


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop over pairs, validating every evaluation.eval_every_steps."""
    def validate():
        return _metrics(job, s.prepared.eval_module(), s.val_batcher)

    return runtime.train(job, s.prepared, s.batcher, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.recipe_state,
                         validate=validate if s.data.val else None)


def save(job: RecipeJob, s: Setup) -> str:
    """The adapter and head (or the whole model) with reward_model.json, where PPO / GRPO load it."""
    full = job.spec.adapter.type == "full"
    output = job.publish(s.model, s.data.tokenizer, s.prepared, full=full)
    if job.parallel.is_main:
        write_manifest(job.job_dir / output, base_model=job.spec.model.base_model, base_model_dir=s.data.model_dir,
                       adapter=job.spec.adapter.type, pad_token_id=s.data.tokenizer.pad_token_id)
    job.parallel.barrier()
    return output


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """Score the trained reward model on the held-out pairs, then the summary (written last)."""
    final = _metrics(job, s.prepared.eval_module(), s.val_batcher) if s.data.val else {}
    evaluation = Evaluation(base=EvalMetrics(**s.recipe_state["base_metrics"]), fine_tuned=EvalMetrics(**final))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def _metrics(job: RecipeJob, module: nn.Module, batcher: PairBatcher) -> dict:
    values = per_pair(lambda batch: module(**batch, per_pair=True), batcher, module=module, batch_size=EVAL_BATCH,
                      precision=job.precision, parallel=job.parallel)
    return reward_metrics(values)


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.reward", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
