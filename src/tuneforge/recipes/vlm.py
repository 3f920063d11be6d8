"""Vision-language fine-tuning: LoRA (or full fine-tuning) of a VLM's language model on chats with images, the
vision tower frozen (or adapted), the projector trained whole, the loss on the assistant's tokens only.

    python -m tuneforge.recipes.vlm --job-dir DIR

The algorithm: setup (image chats tokenized by the model's processor, the base model and its score, what
trains) -> train (next-token loss through the model's multimodal forward, on the runtime's loop) -> save
(DIR/adapter/: the LoRA adapter with the projector beside it, and the processor; or DIR/model/) -> evaluate
(held-out loss and the greedy answers' generated metrics, base vs trained). Exit codes, resume, stops, events
and the summary are the runtime's (engine/runtime). Examples are never packed: a row would cut images.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tuneforge.data.formats import Example
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, file_sha256, load_examples, split_indices
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.engine import runtime
from tuneforge.engine.adapters import parameter_counts
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.runtime import RecipeJob, ResumePoint, TrainingResult, format_metrics
from tuneforge.engine.vision.data import VisionBatcher, VisionChatTokenizer, fit_vision_examples
from tuneforge.engine.vision.loss import VisionLMLoss
from tuneforge.engine.vision.models import load_processor, load_vlm, trainable_vlm
from tuneforge.evaluation.vision import generated_metrics, vlm_answers, vlm_likelihood
from tuneforge.spec.job import LIKELIHOOD_METRICS
from tuneforge.spec.jobdir import EvalMetrics, Evaluation, GenerationSample, JobSummary

EVAL_BATCH = 8


@dataclass
class Data:
    model_dir: Path
    processor: Any
    train: VisionBatcher
    val: VisionBatcher
    val_examples: list[Example]  # the validation records, for the generated answers
    image_tokens: int  # in the training examples


@dataclass
class Setup:
    data: Data
    model: nn.Module  # a PEFT model over the VLM, or the VLM itself for full fine-tuning
    trainable_parameters: int
    schedule: object
    prepared: Prepared
    resume: ResumePoint
    data_position: dict
    recipe_state: dict = field(default_factory=dict)  # kept in checkpoints: the base metrics


def run(job_dir: Path, *, progress: bool = True) -> JobSummary:
    """Run the job described by job_dir/spec.json to completion; returns its summary."""
    return runtime.run_recipe(job_dir, vlm, progress=progress)


def vlm(job: RecipeJob) -> JobSummary:
    s = setup(job)
    training = train(job, s)
    output = save(job, s)
    return evaluate(job, s, training, output)


def setup(job: RecipeJob) -> Setup:
    """Image chats, the checkpoint to resume from, the base VLM and its score, what trains, the plan."""
    spec = job.spec
    data = load_data(job)
    job.phase("data_s")
    resume = job.resume_point()
    base = load_vlm(data.model_dir, spec, job.precision)
    job.phase("model_load_s")
    state = {"base_metrics": base_metrics(job, data, base, resume)}
    job.phase("base_eval_s")
    model = trainable_vlm(base, spec)
    model.train()
    trainable, total = parameter_counts(model)
    loss = VisionLMLoss(model)
    resolved = spec.model_copy(deep=True)
    resolved.dataset.format, resolved.dataset.prompt_template = "image_chat", "chat"
    job.resolve_training(resolved, examples=len(data.train), loss_module=loss, batcher=data.train,
                         model_dir=data.model_dir)
    schedule = job.schedule(len(data.train))
    prepared = job.prepare(loss, model, total_steps=schedule.total_steps)
    cfg = job.spec.training
    data_position = {"dataset_sha256": file_sha256(spec.dataset.path), "units": len(data.train),
                     "examples_per_step": cfg.batch_size, "seed": cfg.seed}
    vision = job.spec.vision
    job.note(f"training {trainable:,} of {total:,} parameters ({spec.adapter.type} on the language model, vision "
             f"tower {vision.vision_tower}, projector {vision.projector}) for {schedule.total_steps} steps: batch "
             f"{cfg.batch_size} examples (micro-batch {cfg.per_device_batch_size} x "
             f"{cfg.gradient_accumulation_steps}), "
             f"learning rate {cfg.learning_rate:g}, {cfg.num_epochs:g} epochs; packing off (it would cut images)",
             kind="plan", trainable_parameters=trainable, total_parameters=total, total_steps=schedule.total_steps,
             batch_size=cfg.batch_size, per_device_batch_size=cfg.per_device_batch_size,
             learning_rate=cfg.learning_rate, packing=False,
             packing_disabled_because="method vlm: packed rows would cut through images",
             vision_tower=vision.vision_tower, projector=vision.projector)
    return Setup(data, model, trainable, schedule, prepared, resume, data_position, state)


def load_data(job: RecipeJob) -> Data:
    """The processor and the image chats: validated (images decoded and checked), tokenized, split, fitted."""
    spec, cfg = job.spec, job.spec.dataset
    model_dir = job.base_model_dir()
    processor = load_processor(model_dir)
    image_token_id = _image_token_id(processor, model_dir)
    examples = _image_chats(cfg.path, cfg.format)
    train_tokenizer = VisionChatTokenizer(processor, image_token_id, Path(cfg.path).parent)
    if cfg.validation_path:
        train_examples, val_examples = examples, _image_chats(cfg.validation_path, "image_chat")
        val_tokenizer = VisionChatTokenizer(processor, image_token_id, Path(cfg.validation_path).parent)
    else:
        train_ids, val_ids = split_indices(len(examples), cfg.train_split, spec.training.seed)
        train_examples, val_examples = [examples[i] for i in train_ids], [examples[i] for i in val_ids]
        val_tokenizer = train_tokenizer
    if len(train_examples) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(cfg.path, 0, "too_few_examples", "", f"at least {MIN_TRAINING_EXAMPLES} "
                                     "training examples", str(len(train_examples)))])
    val_examples = val_examples[: spec.evaluation.max_eval_examples or None]
    tokenized = [train_tokenizer.tokenize(e) for e in train_examples]
    train, too_long, no_labels = fit_vision_examples(tokenized, max_seq_length=cfg.max_seq_length,
                                                     too_long=cfg.too_long, file=cfg.path)
    if len(train) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(cfg.path, 0, "too_few_examples", "dataset.max_seq_length",
                                     f"at least {MIN_TRAINING_EXAMPLES} examples within max_seq_length "
                                     f"{cfg.max_seq_length} (image tokens included)",
                                     f"{len(train)} of {len(train_examples)}")])
    tokenized_val = [(e, val_tokenizer.tokenize(e)) for e in val_examples]
    val_pairs = [(e, t) for e, t in tokenized_val if len(t) <= cfg.max_seq_length and t.tokens.num_label_tokens]
    pad = processor.tokenizer.pad_token_id
    image_tokens = sum(item.image_tokens for item in train)
    job.note(f"dataset ready: {len(train)} training and {len(val_pairs)} validation image chats "
             f"({sum(len(i.images) for i in train)} images, {image_tokens} image tokens)",
             kind="dataset", format="image_chat", template="chat", train_examples=len(train),
             validation_examples=len(val_pairs), train_label_tokens=sum(i.tokens.num_label_tokens for i in train),
             train_images=sum(len(i.images) for i in train), train_image_tokens=image_tokens,
             dropped_too_long=too_long, dropped_no_labels=no_labels)
    return Data(model_dir, processor, VisionBatcher(train, pad, train_tokenizer),
                VisionBatcher([t for _, t in val_pairs], pad, val_tokenizer), [e for e, _ in val_pairs], image_tokens)


def _image_chats(path: str, fmt: str) -> list[Example]:
    examples, detected = load_examples(path, fmt)
    if detected != "image_chat":
        raise DataError([DataProblem(path, 0, "wrong_format", "dataset.format", "image_chat records (messages whose "
                                     "content holds image_url parts) for method vlm", f"{detected} records")])
    return examples


def _image_token_id(processor, model_dir: Path) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    if token_id is None:
        from tuneforge.spec.loader import SpecError

        raise SpecError(f"model.base_model {model_dir}: its processor and config name no image token")
    return int(token_id)


def base_metrics(job: RecipeJob, data: Data, base: nn.Module, resume: ResumePoint) -> dict:
    """The base model's held-out scores, measured once and kept across resumes."""
    if resume.path is not None or not job.spec.evaluation.eval_before_training or not len(data.val):
        return resume.saved.get("base_metrics", {})
    metrics = _metrics(job, data, base, VisionLMLoss(base))
    job.note(f"base model: {format_metrics(_scalars(metrics))}", kind="eval", model="base", step=0,
             metrics=_scalars(metrics))
    return metrics


def train(job: RecipeJob, s: Setup) -> TrainingResult:
    """The runtime's loop over image chats, validating every evaluation.eval_every_steps."""
    def validate():
        return _scalars(_metrics(job, s.data, s.model, s.prepared.eval_module()))

    return runtime.train(job, s.prepared, s.data.train, s.schedule, micro=job.spec.training.per_device_batch_size,
                         resume=s.resume, data_position=s.data_position, recipe_state=s.recipe_state,
                         validate=validate if len(s.data.val) else None)


def save(job: RecipeJob, s: Setup) -> str:
    """The adapter (with the projector beside it) or the whole model, and the processor, where PEFT loads it."""
    return job.publish(s.model, s.data.processor, s.prepared, full=job.spec.adapter.type == "full")


def evaluate(job: RecipeJob, s: Setup, training: TrainingResult, output: str) -> JobSummary:
    """Score the trained model on the held-out chats, then the summary (written last)."""
    final = _metrics(job, s.data, s.model, s.prepared.eval_module()) if len(s.data.val) else {}
    evaluation = Evaluation(base=EvalMetrics(**s.recipe_state["base_metrics"]), fine_tuned=EvalMetrics(**final))
    return job.finish(training, s.prepared, evaluation=evaluation, trainable_parameters=s.trainable_parameters,
                      output=output)


def _metrics(job: RecipeJob, data: Data, model: nn.Module, loss_module: nn.Module) -> dict:
    """evaluation.metrics on the validation chats: likelihood ones with the loss, generated ones from greedy
    answers (with a few samples for the summary)."""
    spec = job.spec.evaluation
    result: dict = {}
    if any(name in LIKELIHOOD_METRICS for name in spec.metrics):
        likelihood = vlm_likelihood(loss_module, data.val, batch_size=EVAL_BATCH, precision=job.precision)
        result.update({k: v for k, v in likelihood.items() if k in spec.metrics or k == "token_accuracy"})
    if spec.needs_generation():
        prompts, answers, references = vlm_answers(model, data.val.tokenizer, data.val_examples,
                                                   max_new_tokens=spec.max_new_tokens,
                                                   batch_size=spec.generation_batch_size, precision=job.precision)
        result.update(generated_metrics(answers, references, spec))
        result["samples"] = [GenerationSample(prompt=p, reference=r, prediction=a).model_dump()
                             for p, a, r in list(zip(prompts, answers, references))[: spec.report_samples]]
    return result


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "samples"}


def main(argv: list[str] | None = None) -> int:
    return runtime.recipe_main(run, argv, prog="python -m tuneforge.recipes.vlm", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
