"""What PPO and GRPO set up alike: the prompts (training and held out), the policy and its reference,
the resolved training section, and the step schedule over prompts."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tuneforge.data.batching import StepSchedule
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, split_indices
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.engine.adapters import trainable_model
from tuneforge.engine.model_loading import load_base_model, load_tokenizer
from tuneforge.engine.rl.prompts import PromptSet, load_prompts
from tuneforge.spec.hyperparameters import resolve_hyperparameters
from tuneforge.spec.job import JobSpec
from tuneforge.spec.loader import SpecError

MAX_AUTO_MICRO_BATCH = 16


@dataclass
class PromptData:
    model_dir: Path
    tokenizer: object
    train: PromptSet
    held_out: PromptSet


def load_prompt_data(job) -> PromptData:
    """The tokenizer, and the prompts rendered and tokenized: training and held-out (validation_path, or
    a train_split carved out of path, at most evaluation.max_eval_examples)."""
    spec, data = job.spec, job.spec.dataset
    budget = data.max_seq_length - spec.rollout.max_new_tokens
    if budget < 1:
        raise SpecError(f"dataset.max_seq_length {data.max_seq_length} leaves no room for a prompt before "
                        f"rollout.max_new_tokens {spec.rollout.max_new_tokens}")
    model_dir = job.base_model_dir()
    tokenizer = load_tokenizer(model_dir)
    options = dict(template=data.prompt_template, max_prompt_tokens=budget, too_long=data.too_long)
    prompts = load_prompts(data.path, tokenizer, **options)
    if data.validation_path:
        train, held_out = prompts, load_prompts(data.validation_path, tokenizer, **options)
    else:
        train_ids, held_ids = split_indices(len(prompts), data.train_split, spec.training.seed)
        train, held_out = PromptSet([prompts[i] for i in train_ids]), PromptSet([prompts[i] for i in held_ids])
    if len(train) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(data.path, 0, "too_few_examples", "", f"at least {MIN_TRAINING_EXAMPLES} "
                                     f"training prompts of at most {budget} tokens (dataset.max_seq_length "
                                     f"{data.max_seq_length} - rollout.max_new_tokens {spec.rollout.max_new_tokens}, "
                                     f"too_long: {data.too_long})", str(len(train)))])
    held_out = PromptSet(held_out.prompts[: spec.evaluation.max_eval_examples or None])
    job.note(f"prompts ready: {len(train)} training and {len(held_out)} held-out", kind="dataset",
             train_examples=len(train), validation_examples=len(held_out), max_prompt_tokens=budget)
    return PromptData(model_dir, tokenizer, train, held_out)


def load_policy(job, model_dir: Path) -> tuple[nn.Module, nn.Module | None]:
    """(the policy to train, the frozen reference or None). With an adapter the reference is the base
    with the adapter disabled (no second copy); full fine-tuning keeps a frozen copy of the base."""
    spec = job.spec
    full = spec.adapter.type == "full"
    model = load_base_model(model_dir, spec.model, job.precision, full_finetune=full)
    reference = copy.deepcopy(model).requires_grad_(False).eval() if full else None
    policy = trainable_model(model, spec)
    policy.train()
    return policy, reference


def resolve_training(job, *, prompts: int, rows_per_update: int) -> JobSpec:
    """The training section for online RL, recorded in resolved_spec.json: an optimizer step trains on
    rows_per_update completions (over every device), so batch_size is that number; the micro-batch is
    at most MAX_AUTO_MICRO_BATCH of them when auto (backing off on out-of-memory); the learning rate
    and the epochs over the prompts as for any method."""
    spec = job.spec.model_copy(deep=True)  # JobSpec guarantees ddp, batch_size auto, prompts_per_step % devices
    world = job.parallel.world_size
    spec.training.batch_size = rows_per_update
    per_device = math.ceil(rows_per_update / world)
    spec = resolve_hyperparameters(spec, prompts, micro_batch=min(per_device, MAX_AUTO_MICRO_BATCH))
    spec.training.packing = False
    return job.resolved(spec)


class PromptSchedule(StepSchedule):
    """Shuffled epochs over the prompts, rollout.prompts_per_step a step, every step whole: an epoch's
    last few prompts that do not fill a step are left out of it (different ones each epoch), so every
    step's rollouts split into equal mini-batches and equal shares per device."""

    def __init__(self, num_prompts: int, *, prompts_per_step: int, seed: int, num_epochs: float,
                 max_steps: int | None):
        if num_prompts < prompts_per_step:
            raise SpecError(f"rollout.prompts_per_step {prompts_per_step} is more than the {num_prompts} training "
                            "prompts")
        super().__init__(num_prompts, examples_per_step=prompts_per_step, seed=seed, num_epochs=num_epochs,
                         max_steps=max_steps)
        self.steps_per_epoch = num_prompts // prompts_per_step
        self.total_steps = max_steps or max(1, round(self.steps_per_epoch * num_epochs))


def prompt_schedule(spec: JobSpec, prompts: int) -> PromptSchedule:
    """Which prompts each step samples (see PromptSchedule)."""
    cfg = spec.training
    return PromptSchedule(prompts, prompts_per_step=spec.rollout.prompts_per_step, seed=cfg.seed,
                          num_epochs=cfg.num_epochs, max_steps=cfg.max_steps)
