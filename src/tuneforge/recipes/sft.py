"""Supervised fine-tuning: LoRA, QLoRA or full fine-tuning of a causal LM, loss on the assistant's tokens.

    python -m tuneforge.recipes.sft --job-dir DIR

The algorithm: setup (data, base model and its score, what is trained, the plan) -> train -> save ->
evaluate. Everything around it is the recipe runtime's (engine/runtime): reading DIR/spec.json, the
exit codes, the resume point, stop requests, the decisions every rank takes together, the
out-of-memory back-off, the events, resolved_spec.json and the summary. Under torchrun every rank runs
this same code on its share of each step (resources.strategy ddp, fsdp or deepspeed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.data.batching import Batcher, StepSchedule
from tuneforge.data.cache import load_tokenized
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, file_sha256, iter_examples, load_examples, split_indices
from tuneforge.data.packing import real_token_fraction
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.templating import PromptRenderer, TokenizedExample, fit_to_length, resolve_template
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts, trainable_model
from tuneforge.engine.base_models import needs_import, resolve_base_model
from tuneforge.engine.checkpoint import checkpoint_name, restore_training_checkpoint
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.loss import CausalLMLoss
from tuneforge.engine.model_loading import load_base_model, load_tokenizer, packed_row_cap, packing_support
from tuneforge.engine.sharded_loading import load_sharded_base, loads_sharded
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult, format_metrics, scalar_metrics
from tuneforge.evaluation.report import build_report
from tuneforge.evaluation.runner import eval_metrics
from tuneforge.evaluation.runner import evaluate as run_metrics
from tuneforge.spec.hyperparameters import MIN_EXAMPLES_PER_ROW, packed_row_length
from tuneforge.spec.jobdir import CHECKPOINTS_DIR, REPORT_FILE, Evaluation, JobSummary, write_report
from tuneforge.spec.loader import SpecError

EVAL_BATCH = 8


@dataclass
class Data:
    model_dir: Path
    tokenizer: Any
    renderer: PromptRenderer
    format: str
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    val_examples: list  # the validation records themselves, for generated metrics (prompts and references)


@dataclass
class Setup:
    data: Data
    model: nn.Module  # what is trained: a PEFT model, or the base model itself for full fine-tuning
    trainable_parameters: int
    batcher: Batcher
    schedule: StepSchedule
    prepared: Prepared
    resume: ResumePoint
    base_metrics: dict
    data_position: dict


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, sft, progress=progress)


def sft(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output_step = choose_output(job, s, training)
    output = save(job, s)
    return evaluate(job, s, training, output, output_step)


# ---- setup ---------------------------------------------------------------------------------------


def setup(job: RecipeJob) -> Setup:
    """Data, the checkpoint to resume from, the base model and its score, what is trained and how."""
    data = load_data(job)
    job.phase("data_s")
    resume = job.resume_point()
    sharded = loads_sharded(job.spec, strategy=job.strategy, world_size=job.parallel.world_size)
    model, base_metrics = load_model(job, data, resume, sharded=sharded)
    trainable, total = parameter_counts(model)
    loss = CausalLMLoss(model)
    batcher, packing_off = resolve(job, data, model, loss)
    cfg = job.spec.training
    schedule = job.schedule(len(batcher))
    # Shard or replicate across ranks, then the optimizer and schedule on what each rank holds (a
    # sharded load reads each rank's weights here, once the shards exist).
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps, weights_dir=data.model_dir if sharded else None)
    if sharded and _scores_base(job, data, resume):
        base_metrics = _base_metrics(job, data, model, prepared.eval_module())
    # The data order is a pure function of these and the step: equal values mean an exact resume.
    data_position = {"dataset_sha256": file_sha256(job.spec.dataset.path), "units": len(batcher),
                     "packing": cfg.packing, "row_length": batcher.row_length, "examples_per_step": cfg.batch_size,
                     "seed": cfg.seed}
    describe_plan(job, data, batcher, schedule, trainable, total, packing_off)
    return Setup(data, model, trainable, batcher, schedule, prepared, resume, base_metrics, data_position)


def load_data(job: RecipeJob) -> Data:
    """Tokenizer and data: validated and tokenized once (cached by content hash), split, fitted."""
    spec, data_cfg = job.spec, job.spec.dataset
    with job.parallel.main_first():
        if needs_import(spec.model.base_model):
            job.note(f"importing {spec.model.base_model} into the model cache (first use only)", kind="model_import")
        model_dir = resolve_base_model(spec.model.base_model)
        tokenizer = load_tokenizer(model_dir)
        data_format, _ = iter_examples(data_cfg.path, data_cfg.format)
        renderer = PromptRenderer(tokenizer, resolve_template(data_cfg.prompt_template, data_format, tokenizer))
        train_set = load_tokenized(data_cfg.path, data_format, renderer)
        val_set = load_tokenized(data_cfg.validation_path, data_format, renderer) if data_cfg.validation_path else None
    if val_set is not None:
        train_ids, val_ids = list(range(len(train_set))), list(range(len(val_set)))
    else:
        val_set = train_set
        train_ids, val_ids = split_indices(len(train_set), data_cfg.train_split, spec.training.seed)
    if len(train_ids) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(data_cfg.path, 0, "too_few_examples", "",
                                     f"at least {MIN_TRAINING_EXAMPLES} training examples", str(len(train_ids)))])
    val_ids = val_ids[: spec.evaluation.max_eval_examples or None]
    train_tokens, stats = fit_to_length([train_set[i] for i in train_ids], max_seq_length=data_cfg.max_seq_length,
                                        too_long=data_cfg.too_long, file=data_cfg.path)
    if len(train_tokens) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(data_cfg.path, 0, "too_few_examples", "dataset.max_seq_length",
                                     f"at least {MIN_TRAINING_EXAMPLES} examples within max_seq_length "
                                     f"{data_cfg.max_seq_length} (too_long: {data_cfg.too_long})",
                                     f"{len(train_tokens)} of {len(train_ids)}")])
    val_tokens, _ = fit_to_length([val_set[i] for i in val_ids], max_seq_length=data_cfg.max_seq_length,
                                  too_long="truncate")
    val_examples = []
    if spec.evaluation.needs_generation() and val_ids:
        source, _ = load_examples(data_cfg.validation_path or data_cfg.path, data_format)
        val_examples = [source[i] for i in val_ids]
    job.note(
        f"dataset ready: {len(train_tokens)} training and {len(val_tokens)} validation examples ({data_format}, "
        f"{renderer.template} template, tokenization {'cached' if train_set.cache_hit else 'done and cached'})",
        kind="dataset", format=data_format, template=renderer.template, train_examples=len(train_tokens),
        validation_examples=len(val_tokens), train_label_tokens=sum(t.num_label_tokens for t in train_tokens),
        cache_hit=train_set.cache_hit, **stats.to_dict(),
    )
    return Data(model_dir, tokenizer, renderer, data_format, train_tokens, val_tokens, val_examples)


def load_model(job: RecipeJob, data: Data, resume: ResumePoint, *, sharded: bool) -> tuple[nn.Module, dict]:
    """The base model, how it scores before training (measured once, kept across resumes), and the
    model to train on top of it. sharded (engine/sharded_loading.py): the base comes without its weights,
    which each rank reads for its shard in job.prepare; it is scored there, after."""
    spec, full = job.spec, job.spec.adapter.type == "full"
    if sharded:
        model = load_sharded_base(data.model_dir, spec, job.precision, strategy=job.strategy, full_finetune=full)
    else:
        model = load_base_model(data.model_dir, spec.model, job.precision, full_finetune=full)
    job.phase("model_load_s")
    base_metrics = resume.saved.get("base_metrics", {})
    if not sharded and _scores_base(job, data, resume):
        base_metrics = _base_metrics(job, data, model, CausalLMLoss(model))
    job.phase("base_eval_s")
    model = trainable_model(model, spec)
    model.train()
    return model, base_metrics


def _scores_base(job: RecipeJob, data: Data, resume: ResumePoint) -> bool:
    return bool(job.spec.evaluation.eval_before_training and data.val and resume.path is None)


def _base_metrics(job: RecipeJob, data: Data, model: nn.Module, loss_module: nn.Module) -> dict:
    """The base model's scores. Kept whole (per-example values, every answer) in each checkpoint: the
    report needs it after a resume. A sharded load scores the model with its new adapter, whose B matrix
    starts at zero, so it computes the base model exactly; PEFT's disable_adapter would not do here:
    it flips requires_grad on the tensors FSDP has registered at that moment (the unsharded ones under
    shard_grad_op), leaving the adapter's shards frozen."""
    with torch.random.fork_rng(devices=[]):  # training draws the same numbers as without the evaluation
        metrics = _metrics(job, data, model, loss_module, details=True)
    job.note(f"base model: {format_metrics(scalar_metrics(metrics))}", kind="eval", model="base", step=0,
             metrics=scalar_metrics(metrics))
    return metrics


def resolve(job: RecipeJob, data: Data, model: nn.Module, loss: CausalLMLoss) -> tuple[Batcher, str | None]:
    """Packing, and the "auto" hyperparameters from the data, the method and the memory, recorded in
    resolved_spec.json. Returns the batcher and why packing is off (None when it is on)."""
    cfg, max_len = job.spec.training, job.spec.dataset.max_seq_length
    attention = model.config._attn_implementation
    row_length, row_reason = packed_row_length([len(t.input_ids) for t in data.train], max_len, attention,
                                               packed_row_cap(model.config))
    supported, why_not = packing_support(model.config, attention, row_length)
    if cfg.packing is True and not supported:
        raise SpecError(f"training.packing: {why_not}; set it to auto or false")
    packing = supported and cfg.packing in (True, "auto")
    batcher = Batcher(data.train, data.tokenizer.pad_token_id, packing=True, max_seq_length=row_length,
                      attention=attention) if packing else None
    if packing and cfg.packing == "auto" and len(data.train) < MIN_EXAMPLES_PER_ROW * len(batcher):
        # Rows of about one example save no padding and still pay the block-diagonal mask (~10% slower).
        why_not = (f"rows of {row_length} tokens would hold {len(data.train) / len(batcher):.1f} examples each "
                   f"(fewer than {MIN_EXAMPLES_PER_ROW:g}): packing saves no padding there")
        packing = False
    if not packing:
        batcher = Batcher(data.train, data.tokenizer.pad_token_id, attention=attention,
                          padding_free=_padding_free(cfg.padding_free, model.config, attention, max_len))
    batcher.row_reason = row_reason if packing else None
    spec = job.spec.model_copy(deep=True)
    spec.dataset.format, spec.dataset.prompt_template = data.format, data.renderer.template
    job.resolve_training(spec, examples=len(data.train), loss_module=loss, batcher=batcher, model_dir=data.model_dir,
                         packing=packing)
    return batcher, None if packing else (why_not or "training.packing is false")


def _padding_free(setting, config, attention: str, max_len: int) -> bool:
    """Whether unpacked micro-batches share rows: where packed examples are verified isolated for the model."""
    supported, why_not = packing_support(config, attention, max_len)
    if setting is True and not supported:
        raise SpecError(f"training.padding_free: {why_not}; set it to auto or false")
    return supported and setting in (True, "auto")


def describe_plan(job: RecipeJob, data: Data, batcher: Batcher, schedule: StepSchedule, trainable: int, total: int,
                  packing_off: str | None) -> None:
    cfg, world = job.spec.training, job.parallel.world_size
    packed = (f", {len(data.train)} examples packed into {len(batcher)} {batcher.row_reason} "
              f"({real_token_fraction(batcher.unit_lengths(), cfg.per_device_batch_size):.1%} real tokens)"
              if cfg.packing else "")
    job.note(
        f"training {trainable:,} of {total:,} parameters ({job.spec.adapter.type}) for {schedule.total_steps} steps: "
        f"batch {cfg.batch_size} {'rows' if cfg.packing else 'examples'} (micro-batch {cfg.per_device_batch_size} x "
        f"{cfg.gradient_accumulation_steps}" + (f" x {world} processes" if job.parallel.enabled else "") + "), "
        f"learning rate {cfg.learning_rate:g}, {cfg.num_epochs:g} epochs" + packed,
        kind="plan", trainable_parameters=trainable, total_parameters=total, total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch, batch_size=cfg.batch_size,
        per_device_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_epochs=cfg.num_epochs, packing=cfg.packing,
        packed_rows=len(batcher) if cfg.packing else None, packed_row_length=batcher.row_length if cfg.packing else None,
        packing_disabled_because=packing_off,
    )


# ---- train, save, evaluate -----------------------------------------------------------------------


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop over this recipe's batches, validating every evaluation.eval_every_steps."""
    validate = (lambda: scalar_metrics(_metrics(job, s.data, s.model, s.prepared.eval_module()))) if s.data.val else None
    return runtime.train(job, s.prepared, s.batcher, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state={"base_metrics": s.base_metrics},
                         validate=validate)


def save(job: RecipeJob, s: Setup) -> str:
    """The final adapter (or model), gathered from the shards, where users and servers load it."""
    return job.publish(s.model, s.data.tokenizer, s.prepared, full=job.spec.adapter.type == "full")


def choose_output(job: RecipeJob, s: Setup, training: TrainingResult) -> int:
    """checkpoint.output best: the best checkpoint's weights go back into the model, to be saved and
    evaluated as the job's output. Returns the step whose weights the output is."""
    best = training.best
    if job.spec.checkpoint.output != "best" or best is None or best.step == training.steps:
        if job.spec.checkpoint.output == "best" and best is None:
            job.note("checkpoint.output best: no checkpoint was scored during training; the output is the last step",
                     level="warning", kind="best_checkpoint")
        return training.steps
    p = s.prepared
    restore_training_checkpoint(job.job_dir / CHECKPOINTS_DIR / checkpoint_name(best.step), model=p.state_module,
                                optimizer=p.optimizer, scheduler=p.scheduler, scaler=p.scaler, parallel=job.parallel)
    job.note(f"the output is the best checkpoint: step {best.step} of {training.steps} ({best.metric}={best.value:.4f})",
             kind="best_checkpoint", step=best.step, metric=best.metric, value=best.value)
    return best.step


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str, output_step: int) -> JobSummary:
    """Score the output model, the report (base vs fine-tuned, DIR/evaluation.json), then the summary
    (written last: its presence means success)."""
    spec = job.spec.evaluation
    final = _metrics(job, s.data, s.model, s.prepared.eval_module(), details=True) if s.data.val else {}
    evaluation = Evaluation(base=eval_metrics(s.base_metrics, spec), fine_tuned=eval_metrics(final, spec))
    report = REPORT_FILE if final else None
    if final and job.parallel.is_main:
        data = job.spec.dataset
        write_report(job.job_dir, build_report(
            spec, base=s.base_metrics or None, fine_tuned=final, examples=len(s.data.val),
            dataset=data.validation_path or f"{data.path} (validation split)", base_model=job.spec.model.base_model,
            fine_tuned_model=f"{output}/ (step {output_step})"))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output, output_step=output_step, report=report)


def _metrics(job: RecipeJob, data: Data, model: nn.Module, loss_module: nn.Module, *, details: bool = False) -> dict:
    return run_metrics(model, loss_module, data.tokenizer, data.renderer, data.val_examples, data.val,
                       job.spec.evaluation, batch_size=EVAL_BATCH, precision=job.precision, parallel=job.parallel,
                       details=details)


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.sft", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
