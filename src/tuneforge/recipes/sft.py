"""Supervised fine-tuning: LoRA, QLoRA or full fine-tuning of a causal LM, loss on the assistant's tokens.

    python -m tuneforge.recipes.sft --job-dir DIR

Reads DIR/spec.json; writes DIR/events.jsonl, DIR/checkpoints/, the final adapter (or model) and
DIR/summary.json. Never touches the database: whoever launched it reads the job directory.
The steps below follow the algorithm: load, build, evaluate the base, train, save, evaluate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tuneforge.data.batching import StepSchedule, collate
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, load_examples, split_examples
from tuneforge.data.templating import PromptRenderer, resolve_template, tokenize_examples
from tuneforge.engine.adapters import make_trainable, parameter_counts
from tuneforge.engine.base_models import needs_import, resolve_base_model
from tuneforge.engine.checkpoint import (
    checkpoint_bytes,
    latest_valid_checkpoint,
    prune_checkpoints,
    remove_staging,
    restore_training_checkpoint,
    save_training_checkpoint,
)
from tuneforge.engine.events import EventReporter
from tuneforge.engine.loss import CausalLMLoss
from tuneforge.engine.model_loading import load_base_model, load_tokenizer
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.precision import resolve_device, resolve_precision
from tuneforge.engine.progress import ProgressDisplay
from tuneforge.engine.quiet import quiet_libraries
from tuneforge.engine.weights import publish_final
from tuneforge.evaluation.runner import evaluate
from tuneforge.spec.jobdir import ADAPTER_DIR, CHECKPOINTS_DIR, MODEL_DIR, SUMMARY_FILE, read_spec, write_json_atomic


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(job_dir: Path, *, progress: bool = True) -> dict:
    """Run the job described by job_dir/spec.json to completion; returns the summary."""
    started = time.time()
    quiet_libraries()
    spec = read_spec(job_dir)
    events = EventReporter(job_dir)
    display = ProgressDisplay(enabled=progress)
    try:
        return _run(job_dir, spec, events, display, started)
    except BaseException as exc:
        display.close()
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        events.emit(f"job failed: {reason}", level="error", kind="status", status="failed", error=reason)
        raise


def _run(job_dir: Path, spec, events: EventReporter, display: ProgressDisplay, started: float) -> dict:
    train_cfg, data_cfg = spec.training, spec.dataset

    def note(message: str, **data) -> None:
        """A milestone: into the event log and onto the terminal."""
        events.emit(message, **data)
        display.message(message)

    # 1. Hardware, precision, seeds.
    device = resolve_device()
    precision = resolve_precision(train_cfg.precision, device)
    seed_everything(train_cfg.seed)
    note(
        f"job started on {device.type} in {precision.name}",
        kind="status", status="running", device=str(device), precision=precision.name,
    )

    # 2. Tokenizer and data: validate, split, template, tokenize.
    if needs_import(spec.model.base_model):
        note(f"importing {spec.model.base_model} into the model cache (first use only)", kind="model_import")
    model_dir = resolve_base_model(spec.model.base_model)
    tokenizer = load_tokenizer(model_dir)
    train_examples, data_format = load_examples(data_cfg.path, data_cfg.format, min_examples=MIN_TRAINING_EXAMPLES)
    if data_cfg.validation_path:
        val_examples, _ = load_examples(data_cfg.validation_path, data_format)
    else:
        train_examples, val_examples = split_examples(train_examples, data_cfg.train_split, train_cfg.seed)
    renderer = PromptRenderer(tokenizer, resolve_template(data_cfg.prompt_template, data_format, tokenizer))
    train_tokens, train_stats = tokenize_examples(
        train_examples, renderer, max_seq_length=data_cfg.max_seq_length, too_long=data_cfg.too_long, file=data_cfg.path
    )
    if spec.evaluation.max_eval_examples:
        val_examples = val_examples[: spec.evaluation.max_eval_examples]
    val_tokens, _ = tokenize_examples(val_examples, renderer, max_seq_length=data_cfg.max_seq_length, too_long="truncate")
    note(
        f"dataset ready: {len(train_tokens)} training and {len(val_tokens)} validation examples ({data_format}, "
        f"{renderer.template} template)",
        kind="dataset", format=data_format, template=renderer.template, train_examples=len(train_tokens),
        validation_examples=len(val_tokens), train_label_tokens=sum(t.num_label_tokens for t in train_tokens),
        **train_stats.to_dict(),
    )

    # 3. The base model, and how it scores before training.
    full = spec.adapter.type == "full"
    model = load_base_model(model_dir, spec.model, precision, full_finetune=full)
    eval_batch = max(train_cfg.per_device_batch_size, 8)
    base_metrics = {}
    if spec.evaluation.eval_before_training and val_tokens:
        base_metrics = evaluate(model, CausalLMLoss(model), tokenizer, renderer, val_examples, val_tokens,
                                spec.evaluation, batch_size=eval_batch, precision=precision)
        note(f"base model: {_fmt(base_metrics)}", kind="eval", model="base", step=0, metrics=_scalars(base_metrics))

    # 4. What is trained, the optimizer and the step schedule.
    model = make_trainable(model, spec.adapter, quantized=spec.model.quantization != "none",
                           gradient_checkpointing=train_cfg.gradient_checkpointing)
    model.train()
    trainable, total = parameter_counts(model)
    loss_module = CausalLMLoss(model)
    schedule = StepSchedule(
        len(train_tokens), batch_size=train_cfg.per_device_batch_size, grad_accum=train_cfg.gradient_accumulation_steps,
        seed=train_cfg.seed, num_epochs=train_cfg.num_epochs, max_steps=train_cfg.max_steps,
    )
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, schedule.total_steps)
    scaler = precision.grad_scaler()
    data_position = {"num_examples": len(train_tokens), "batch_size": train_cfg.per_device_batch_size,
                     "grad_accum": train_cfg.gradient_accumulation_steps, "seed": train_cfg.seed}
    note(
        f"training {trainable:,} of {total:,} parameters ({spec.adapter.type}) for {schedule.total_steps} steps",
        kind="plan", trainable_parameters=trainable, total_parameters=total, total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch,
    )

    # 5. Resume from the newest checkpoint that verifies, if this job directory has one.
    checkpoints = job_dir / CHECKPOINTS_DIR
    for leftover in remove_staging(checkpoints):
        note(f"removed unfinished checkpoint {leftover.name}", kind="checkpoint_discarded", path=leftover.name)
    resumed_from = latest_valid_checkpoint(
        checkpoints,
        on_invalid=lambda path, why: note(
            f"skipping checkpoint {path.name}: {why}", level="warning", kind="checkpoint_invalid", path=path.name, reason=why
        ),
    )
    state = {"tokens_seen": 0, "trained_tokens": 0, "train_seconds": 0.0}
    start_step = 0
    if resumed_from is not None:
        saved = restore_training_checkpoint(resumed_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if saved.get("data_position") != data_position:
            raise ValueError(
                f"cannot resume from {resumed_from}: the data or batch settings changed since it was saved "
                f"({saved.get('data_position')} then, {data_position} now)"
            )
        start_step = saved["step"]
        state.update({k: saved[k] for k in state if k in saved})
        note(f"resumed from {resumed_from.name} at step {start_step}", kind="resumed", step=start_step, path=resumed_from.name)

    def checkpoint(step: int, metrics: dict) -> None:
        path = save_training_checkpoint(
            checkpoints, step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            trainer_state={**state, "epoch": schedule.epoch_at(step), "data_position": data_position, "metrics": metrics},
        )
        prune_checkpoints(checkpoints, spec.checkpoint.keep_last, protect={resumed_from})
        events.emit(f"checkpoint at step {step}", kind="checkpoint", step=step, path=f"{CHECKPOINTS_DIR}/{path.name}",
                    bytes=checkpoint_bytes(path), metrics=metrics)

    # 6. Train.
    display.start(schedule.total_steps, start_step)
    last_checkpoint_time = time.monotonic()
    last_eval: dict = {}
    losses: list[float] = []
    train_started = time.monotonic() - state["train_seconds"]
    for step in range(start_step, schedule.total_steps):
        step_started = time.perf_counter()
        plan = schedule.plan(step)
        batches = [collate([train_tokens[i] for i in ids], tokenizer.pad_token_id) for ids in plan.micro_batches]
        step_label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_loss, step_correct, step_tokens = 0.0, 0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision.autocast():
                loss_sum, _, correct = loss_module(**batch)
            # Normalize by the whole step's label tokens, so accumulation equals one big batch.
            loss = loss_sum / step_label_tokens
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(loss_sum.detach())
            step_correct += int(correct)
            step_tokens += int(batch["attention_mask"].sum())
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = None
        if train_cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train_cfg.max_grad_norm))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        learning_rate = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        elapsed = time.perf_counter() - step_started
        train_loss = step_loss / step_label_tokens
        losses.append(train_loss)
        state["tokens_seen"] += step_tokens
        state["trained_tokens"] += step_label_tokens
        state["train_seconds"] = time.monotonic() - train_started
        tokens_per_second = step_tokens / elapsed
        eta = (schedule.total_steps - done) * state["train_seconds"] / max(1, done - start_step)
        if done % train_cfg.logging_steps == 0 or done == schedule.total_steps:
            events.metrics(
                f"step {done}/{schedule.total_steps}: train_loss={train_loss:.4f}",
                step=done, total_steps=schedule.total_steps, epoch=round(schedule.epoch_at(done), 4),
                train_loss=train_loss, train_mean_token_accuracy=step_correct / step_label_tokens,
                learning_rate=learning_rate, grad_norm=grad_norm, tokens_per_second=tokens_per_second,
                tokens_seen=state["tokens_seen"], example_ids=plan.example_ids,
            )
        display.update(done, loss=train_loss, learning_rate=learning_rate, tokens_per_second=tokens_per_second, eta_s=eta)

        if spec.evaluation.eval_every_steps and done % spec.evaluation.eval_every_steps == 0 and done < schedule.total_steps and val_tokens:
            last_eval = evaluate(model, loss_module, tokenizer, renderer, val_examples, val_tokens, spec.evaluation,
                                 batch_size=eval_batch, precision=precision)
            events.metrics(f"step {done}: {_fmt(last_eval)}", step=done, total_steps=schedule.total_steps,
                           **{f"valid_{k}": v for k, v in _scalars(last_eval).items()})
            display.message(f"step {done}: {_fmt(last_eval)}")
        every_steps = spec.checkpoint.every_steps and done % spec.checkpoint.every_steps == 0
        every_minutes = spec.checkpoint.every_minutes and time.monotonic() - last_checkpoint_time >= spec.checkpoint.every_minutes * 60
        if (every_steps or every_minutes) and done < schedule.total_steps:
            checkpoint(done, {"train_loss": train_loss, **{f"valid_{k}": v for k, v in _scalars(last_eval).items()}})
            last_checkpoint_time = time.monotonic()
    display.close()

    # 7. Save: the last checkpoint, and the final adapter (or model) where users and servers load it.
    final_step = schedule.total_steps
    final_loss = losses[-1] if losses else None
    checkpoint(final_step, {"train_loss": final_loss})
    output = job_dir / (MODEL_DIR if full else ADAPTER_DIR)
    publish_final(model, tokenizer, output)
    note(f"saved the {'model' if full else 'adapter'} to {output.name}/", kind="artifact", path=output.name)

    # 8. Evaluate the fine-tuned model, and write the summary last: its presence means success.
    final_metrics = {}
    if val_tokens:
        final_metrics = evaluate(model, loss_module, tokenizer, renderer, val_examples, val_tokens, spec.evaluation,
                                 batch_size=eval_batch, precision=precision)
        note(f"fine-tuned model: {_fmt(final_metrics)}", kind="eval", model="fine-tuned", step=final_step,
                    metrics=_scalars(final_metrics))
    tail = losses[-10:]
    summary = {
        "status": "succeeded",
        "method": spec.method,
        "adapter": spec.adapter.type,
        "base_model": spec.model.base_model,
        "device": str(device),
        "precision": precision.name,
        "steps": final_step,
        "epochs": round(schedule.epoch_at(final_step), 4),
        "train_loss": final_loss,
        "train_loss_last_10_mean": sum(tail) / len(tail) if tail else None,
        "tokens_seen": state["tokens_seen"],
        "trained_tokens": state["trained_tokens"],
        "trainable_parameters": trainable,
        "eval": {"base": base_metrics, "fine_tuned": final_metrics},
        "output": output.name,
        "train_seconds": round(state["train_seconds"], 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json_atomic(job_dir / SUMMARY_FILE, summary)
    events.emit("job succeeded", kind="status", status="succeeded", summary=_scalars(summary))
    return summary


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "no metrics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.recipes.sft", description=__doc__)
    parser.add_argument("--job-dir", required=True, type=Path, help="job directory holding spec.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    args = parser.parse_args(argv)
    run(args.job_dir, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
