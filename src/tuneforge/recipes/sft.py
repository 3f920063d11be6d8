"""Supervised fine-tuning: LoRA, QLoRA or full fine-tuning of a causal LM, loss on the assistant's tokens.

    python -m tuneforge.recipes.sft --job-dir DIR

Reads DIR/spec.json; writes DIR/events.jsonl, DIR/checkpoints/, the final adapter (or model) and
DIR/summary.json. Never touches the database: whoever launched it reads the job directory.
Exit codes: 0 succeeded, 1 failed, 2 bad input (not worth retrying), 75 preempted after a checkpoint.
The steps below follow the algorithm: load, build, evaluate the base, train, save, evaluate.

Under torchrun (resources.num_gpus x num_nodes > 1) every rank runs this same code on its share of each
step (resources.strategy ddp or fsdp); rank 0 alone writes events, the summary and the final output,
and every decision that must be the same everywhere (resume point, checkpoint now, stop) is agreed by a
collective.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tuneforge.data.batching import Batcher, StepSchedule, micro_batches
from tuneforge.data.cache import load_tokenized
from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, file_sha256, iter_examples, load_examples, split_indices
from tuneforge.data.packing import real_token_fraction
from tuneforge.data.problems import DataError, DataProblem
from tuneforge.data.templating import PromptRenderer, TemplateError, fit_to_length, resolve_template
from tuneforge.engine import faults
from tuneforge.engine.adapters import make_trainable, parameter_counts
from tuneforge.engine.base_models import ModelNotFound, needs_import, resolve_base_model
from tuneforge.engine.distributed import (
    Distributed,
    full_state_dict,
    init_distributed,
    rank_memory,
    shutdown,
    start_deepspeed,
    unwrap,
    wrap,
)
from tuneforge.engine.checkpoint import (
    CheckpointKeeper,
    checkpoint_bytes,
    latest_valid_checkpoint,
    read_trainer_state,
    remove_staging,
    restore_training_checkpoint,
)
from tuneforge.engine.events import EventReporter
from tuneforge.engine.loss import CausalLMLoss
from tuneforge.engine.micro_batch import optimizer_state_bytes, plan_micro_batch, probe_cuda
from tuneforge.engine.model_loading import load_base_model, load_tokenizer, packing_support
from tuneforge.engine.optim import build_optimizer, build_scheduler
from tuneforge.engine.precision import PrecisionError, resolve_device, resolve_precision
from tuneforge.engine.preemption import Preempted, PreemptionWatcher
from tuneforge.engine.progress import ProgressDisplay, process_age
from tuneforge.engine.quiet import quiet_libraries
from tuneforge.engine.train_step import optimizer_step
from tuneforge.engine.weights import publish_final
from tuneforge.evaluation.runner import evaluate
from tuneforge.spec.hyperparameters import resolve_hyperparameters
from tuneforge.spec.jobdir import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    MODEL_DIR,
    SUMMARY_FILE,
    read_spec,
    write_json_atomic,
    write_spec,
)
from tuneforge.spec.loader import SpecError

INPUT_ERRORS = (DataError, TemplateError, ModelNotFound, PrecisionError, SpecError)


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
    parallel = init_distributed(spec.resources.collective_timeout_s)
    events = EventReporter(job_dir, enabled=parallel.is_main)
    display = ProgressDisplay(enabled=progress and parallel.is_main)
    watcher = PreemptionWatcher.from_environment().install()
    try:
        return _run(job_dir, spec, events, display, watcher, started, parallel)
    except Preempted:
        raise
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        events.emit(f"job failed: {reason}", level="error", kind="status", status="failed", error=reason,
                    retryable=not isinstance(exc, INPUT_ERRORS))
        raise
    finally:
        display.close()
        watcher.uninstall()
        shutdown()


def _run(job_dir: Path, spec, events: EventReporter, display: ProgressDisplay, watcher: PreemptionWatcher,
         started: float, parallel: Distributed) -> dict:
    train_cfg, data_cfg = spec.training, spec.dataset
    # Start-up phases, reported with the first step: what a user waits for before training starts.
    startup = {"imports_s": process_age(), "clock": time.perf_counter()}

    def phase(name: str) -> None:
        now = time.perf_counter()
        startup[name] = round(now - startup["clock"], 3)
        startup["clock"] = now

    def note(message: str, **data) -> None:
        """A milestone: into the event log and onto the terminal."""
        events.emit(message, **data)
        display.message(message)

    # 1. Hardware, precision, seeds.
    device = resolve_device(parallel.local_rank)
    precision = resolve_precision(train_cfg.precision, device)
    strategy = spec.resources.strategy if parallel.enabled else "single"
    if strategy == "deepspeed":
        from tuneforge.launch.deepspeed import deepspeed_problem

        if problem := deepspeed_problem(spec):
            raise SpecError(problem)
    sharded = strategy == "fsdp"
    # FSDP shards and ZeRO partitions are saved, restored and gathered through the wrapped module; one
    # process and DDP replicas through the model itself.
    wrapped_state = strategy in ("fsdp", "deepspeed")
    # Same seed on every rank: identical adapter initialization (FSDP shards each rank's own copy).
    seed_everything(train_cfg.seed)
    where = f"{parallel.world_size} processes ({strategy})" if parallel.enabled else device.type
    note(f"job started on {where} in {precision.name}", kind="status", status="running", device=str(device),
         precision=precision.name, world_size=parallel.world_size, strategy=strategy)

    # 2. Tokenizer and data: validated and tokenized once (cached by content hash), split, fitted.
    with parallel.main_first():
        if needs_import(spec.model.base_model):
            note(f"importing {spec.model.base_model} into the model cache (first use only)", kind="model_import")
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
        train_ids, val_ids = split_indices(len(train_set), data_cfg.train_split, train_cfg.seed)
    if len(train_ids) < MIN_TRAINING_EXAMPLES:
        raise DataError([DataProblem(data_cfg.path, 0, "too_few_examples", "",
                                     f"at least {MIN_TRAINING_EXAMPLES} training examples", str(len(train_ids)))])
    val_ids = val_ids[: spec.evaluation.max_eval_examples or None]
    train_tokens, train_stats = fit_to_length([train_set[i] for i in train_ids], max_seq_length=data_cfg.max_seq_length,
                                              too_long=data_cfg.too_long, file=data_cfg.path)
    val_tokens, _ = fit_to_length([val_set[i] for i in val_ids], max_seq_length=data_cfg.max_seq_length,
                                  too_long="truncate")
    # Generated metrics need the examples themselves (prompts and references), not only their tokens.
    val_examples = []
    if "exact_match" in spec.evaluation.metrics and val_ids:
        source, _ = load_examples(data_cfg.validation_path or data_cfg.path, data_format)
        val_examples = [source[i] for i in val_ids]
    note(
        f"dataset ready: {len(train_tokens)} training and {len(val_tokens)} validation examples ({data_format}, "
        f"{renderer.template} template, tokenization {'cached' if train_set.cache_hit else 'done and cached'})",
        kind="dataset", format=data_format, template=renderer.template, train_examples=len(train_tokens),
        validation_examples=len(val_tokens), train_label_tokens=sum(t.num_label_tokens for t in train_tokens),
        cache_hit=train_set.cache_hit, **train_stats.to_dict(),
    )

    phase("data_s")

    # 3. The checkpoint to resume from, if this job directory has one that verifies.
    checkpoints = job_dir / CHECKPOINTS_DIR
    resumed_from = None
    if parallel.is_main:  # one rank decides, so every rank resumes from the same checkpoint
        for leftover in remove_staging(checkpoints):
            note(f"removed unfinished checkpoint {leftover.name}", kind="checkpoint_discarded", path=leftover.name)
        resumed_from = latest_valid_checkpoint(
            checkpoints,
            on_invalid=lambda path, why: note(f"skipping checkpoint {path.name}: {why}", level="warning",
                                              kind="checkpoint_invalid", path=path.name, reason=why),
        )
    resumed_from = parallel.broadcast(resumed_from)
    saved_state = read_trainer_state(resumed_from) if resumed_from else {}

    # 4. The base model, and how it scores before training (measured once, kept across resumes).
    full = spec.adapter.type == "full"
    model = load_base_model(model_dir, spec.model, precision, full_finetune=full)
    phase("model_load_s")
    eval_batch = 8
    base_metrics = saved_state.get("base_metrics", {})
    if spec.evaluation.eval_before_training and val_tokens and not resumed_from:
        base_metrics = _scalars(evaluate(model, CausalLMLoss(model), tokenizer, renderer, val_examples, val_tokens,
                                         spec.evaluation, batch_size=eval_batch, precision=precision,
                                         parallel=parallel), keep_samples=True)
        note(f"base model: {_fmt(base_metrics)}", kind="eval", model="base", step=0, metrics=_scalars(base_metrics))

    phase("base_eval_s")

    # 5. What is trained; "auto" hyperparameters resolved from the data, the method and the memory.
    model = make_trainable(model, spec.adapter, quantized=spec.model.quantization != "none",
                           gradient_checkpointing=train_cfg.gradient_checkpointing)
    model.train()
    trainable, total = parameter_counts(model)
    loss_module = CausalLMLoss(model)
    attention = model.config._attn_implementation
    supported, why_not = packing_support(model.config, attention, data_cfg.max_seq_length)
    if train_cfg.packing is True and not supported:
        raise SpecError(f"training.packing: {why_not}; set it to auto or false")
    packing = supported and train_cfg.packing in (True, "auto")
    batcher = Batcher(train_tokens, tokenizer.pad_token_id, packing=packing, max_seq_length=data_cfg.max_seq_length,
                      attention=attention)
    spec = resolve_hyperparameters(spec, len(train_tokens), num_rows=len(batcher) if packing else None)
    if spec.training.per_device_batch_size == "auto":
        target = -(-spec.training.batch_size // parallel.world_size)  # this device's share of a step
        if device.type == "cuda" and not parallel.enabled:
            lengths = batcher.unit_lengths()
            longest = sorted(range(len(batcher)), key=lambda u: -lengths[u])[:target]
            trainable_params = [p for p in model.parameters() if p.requires_grad]
            micro = probe_cuda(loss_module, lambda n: batcher.collate(longest[:n]), target, precision=precision,
                               reserve_bytes=optimizer_state_bytes(trainable_params, train_cfg.optimizer))
        else:
            # Several ranks cannot probe (an out-of-memory on one strands the others in a collective):
            # the planner's per-rank estimate decides, the smallest answer of any rank wins.
            micro = min(parallel.gather(plan_micro_batch(spec, model_dir, target, device_type=device.type)))
        spec = resolve_hyperparameters(spec, len(train_tokens), num_rows=len(batcher) if packing else None,
                                       micro_batch=micro)
    spec.training.packing = packing
    train_cfg = spec.training
    if parallel.is_main:
        write_spec(job_dir, spec)  # the resolved spec: what this job really runs with

    # 6. Shard or replicate across ranks (before the optimizer: FSDP replaces the parameters), the
    # optimizer and the step schedule (over examples, or over packed rows).
    train_module = wrap(loss_module, strategy=strategy, sharding=spec.resources.fsdp_sharding,
                        cpu_offload=spec.resources.cpu_offload, precision=precision, parallel=parallel,
                        num_nodes=spec.resources.num_nodes)
    if sharded and spec.resources.cpu_offload and device.type == "cpu":
        note("resources.cpu_offload has no effect when training on CPUs: the shards already live in host memory",
             level="warning", kind="cpu_offload_ignored")
    parameters = [p for p in model.parameters() if p.requires_grad]
    schedule = StepSchedule(len(batcher), examples_per_step=train_cfg.batch_size, seed=train_cfg.seed,
                            num_epochs=train_cfg.num_epochs, max_steps=train_cfg.max_steps)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, schedule.total_steps)
    scaler = precision.grad_scaler()
    if strategy == "deepspeed":
        from tuneforge.launch.deepspeed import check_config, config_for, config_source

        resolved = spec.model_copy(deep=True)
        resolved.training.precision = precision.name
        ds_config = config_for(resolved)
        check_config(ds_config, world_size=parallel.world_size, source=config_source(spec))
        train_module = start_deepspeed(loss_module, optimizer, scheduler, ds_config)
        scaler = None  # DeepSpeed scales fp16 losses itself
    state_module = train_module if wrapped_state else model
    # The data order is a pure function of these and the step: equal values mean an exact resume.
    data_position = {"dataset_sha256": file_sha256(data_cfg.path), "units": len(batcher), "packing": packing,
                     "examples_per_step": train_cfg.batch_size, "seed": train_cfg.seed}
    micro = train_cfg.per_device_batch_size
    unit = "rows" if packing else "examples"
    note(
        f"training {trainable:,} of {total:,} parameters ({spec.adapter.type}) for {schedule.total_steps} steps: "
        f"batch {train_cfg.batch_size} {unit} (micro-batch {micro} x {train_cfg.gradient_accumulation_steps}"
        + (f" x {parallel.world_size} processes" if parallel.enabled else "") + "), "
        f"learning rate {train_cfg.learning_rate:g}, {train_cfg.num_epochs:g} epochs"
        + (f", {len(train_tokens)} examples packed into {len(batcher)} rows of {data_cfg.max_seq_length} "
           f"({real_token_fraction(batcher.unit_lengths(), micro):.1%} real tokens)" if packing else ""),
        kind="plan", trainable_parameters=trainable, total_parameters=total, total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch, batch_size=train_cfg.batch_size, per_device_batch_size=micro,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps, learning_rate=train_cfg.learning_rate,
        num_epochs=train_cfg.num_epochs, packing=packing, packed_rows=len(batcher) if packing else None,
        packing_disabled_because=None if packing else (why_not or "training.packing is false"),
    )

    # 7. Restore the exact training state: weights, optimizer, scheduler, scaler, RNGs, step.
    state = {"tokens_seen": 0, "trained_tokens": 0, "train_seconds": 0.0}
    start_step = 0
    if resumed_from is not None:
        if saved_state.get("data_position") != data_position:
            raise SpecError(
                f"cannot resume from {resumed_from}: the data or batch settings changed since it was saved "
                f"({saved_state.get('data_position')} then, {data_position} now)"
            )
        _check_layout(resumed_from, saved_state, strategy, parallel.world_size)
        restore_training_checkpoint(resumed_from, model=state_module, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, parallel=parallel)
        start_step = saved_state["step"]
        state.update({k: saved_state[k] for k in state if k in saved_state})
        note(f"resumed from {resumed_from.name} at step {start_step}", kind="resumed", step=start_step,
             path=resumed_from.name)
    keeper = CheckpointKeeper(checkpoints, every_steps=spec.checkpoint.every_steps,
                              every_minutes=spec.checkpoint.every_minutes, keep_last=spec.checkpoint.keep_last,
                              resumed_from=resumed_from, best=saved_state.get("best"))

    def checkpoint(step: int, metrics: dict) -> None:
        path, is_best = keeper.save(step, model=state_module, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                    parallel=parallel, sharded=sharded,
                                    trainer_state={**state, "epoch": schedule.epoch_at(step), "data_position": data_position,
                                                   "metrics": metrics, "base_metrics": base_metrics,
                                                   "strategy": strategy, "world_size": parallel.world_size})
        if parallel.is_main:
            events.emit(f"checkpoint at step {step}", kind="checkpoint", step=step, path=f"{CHECKPOINTS_DIR}/{path.name}",
                        bytes=checkpoint_bytes(path), metrics=metrics, is_best=is_best)

    phase("setup_s")

    # 8. Train.
    display.start(schedule.total_steps, start_step)
    last_eval: dict = {}
    losses: list[float] = []
    train_started = time.monotonic() - state["train_seconds"]
    # A rank whose share of a step is short runs this with weight 0 (same collectives on every rank).
    stand_in = batcher.collate((0,)) if parallel.enabled else None
    for step in range(start_step, schedule.total_steps):
        step_started = time.perf_counter()
        plan = schedule.plan(step)
        mine, per_rank = parallel.shard(list(plan.example_ids))
        while True:
            batches = [batcher.collate(units) for units in micro_batches(tuple(mine), micro)]
            try:
                result = optimizer_step(train_module, batches, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                        precision=precision, max_grad_norm=train_cfg.max_grad_norm,
                                        parameters=parameters, parallel=parallel,
                                        micro_batches=(train_cfg.gradient_accumulation_steps if strategy == "deepspeed"
                                                       else -(-per_rank // micro)), stand_in=stand_in)
                break
            except torch.OutOfMemoryError:
                # Nothing was stepped yet: drop the partial gradients and redo the step in smaller pieces.
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if micro == 1 or parallel.enabled:  # the other ranks are already in the next collective
                    raise
                micro //= 2
                note(f"out of memory at step {step + 1}; continuing with micro-batches of {micro}",
                     level="warning", kind="micro_batch", step=step + 1, per_device_batch_size=micro)
        done = step + 1
        tokens_per_second = result.tokens / (time.perf_counter() - step_started)
        losses.append(result.loss)
        state["tokens_seen"] += result.tokens
        state["trained_tokens"] += result.label_tokens
        state["train_seconds"] = time.monotonic() - train_started
        if done == start_step + 1:
            phase("first_step_s")
            startup.pop("clock")
            parts = [v for k, v in startup.items() if v is not None]
            events.emit(f"first optimizer step {sum(parts):.1f}s after the process started", kind="startup",
                        to_first_step_s=round(sum(parts), 3), **startup)
        if done % train_cfg.logging_steps == 0 or done == schedule.total_steps:
            events.metrics(
                f"step {done}/{schedule.total_steps}: train_loss={result.loss:.4f}",
                step=done, total_steps=schedule.total_steps, epoch=round(schedule.epoch_at(done), 4),
                train_loss=result.loss, train_mean_token_accuracy=result.token_accuracy,
                learning_rate=result.learning_rate, grad_norm=result.grad_norm, tokens_per_second=tokens_per_second,
                tokens_seen=state["tokens_seen"], real_token_fraction=result.tokens / result.padded_tokens,
                example_ids=batcher.example_ids(plan.example_ids),
            )
        eta = (schedule.total_steps - done) * state["train_seconds"] / max(1, done - start_step)
        display.update(done, loss=result.loss, learning_rate=result.learning_rate,
                       tokens_per_second=tokens_per_second, eta_s=eta)
        faults.after_step(done)
        if done == schedule.total_steps:
            break

        if spec.evaluation.eval_every_steps and done % spec.evaluation.eval_every_steps == 0 and val_tokens:
            last_eval = evaluate(model, unwrap(train_module), tokenizer, renderer, val_examples, val_tokens,
                                 spec.evaluation, batch_size=eval_batch, precision=precision, parallel=parallel)
            events.metrics(f"step {done}: {_fmt(last_eval)}", step=done, total_steps=schedule.total_steps,
                           **{f"valid_{k}": v for k, v in _scalars(last_eval).items()})
            display.message(f"step {done}: {_fmt(last_eval)}")
        metrics = {"train_loss": result.loss, **{f"valid_{k}": v for k, v in _scalars(last_eval).items()}}
        # Time-based checkpoints and stop requests can differ between ranks: any rank's wins for all.
        due, stop = (bool(v) for v in parallel.sum([float(keeper.due(done)), float(watcher.requested)]))
        if due or stop:
            checkpoint(done, metrics)
        if stop:
            note(f"preempted ({watcher.reason}) after step {done}; checkpoint saved, the job resumes from it",
                 level="warning", kind="status", status="preempted", step=done, reason=watcher.reason)
            raise Preempted(done, watcher.reason)

    # 9. Save: the last checkpoint, and the final adapter (or model) where users and servers load it.
    final_step = schedule.total_steps
    checkpoint(final_step, {"train_loss": losses[-1] if losses else None})
    output = job_dir / (MODEL_DIR if full else ADAPTER_DIR)
    # A sharded model is gathered into one state dict on rank 0 (collective) and written as one file.
    consolidated = full_state_dict(train_module, trainable_only=not full) if wrapped_state else None
    if parallel.is_main:
        publish_final(model, tokenizer, output, state_dict=consolidated)
        note(f"saved the {'model' if full else 'adapter'} to {output.name}/", kind="artifact", path=output.name)
    del consolidated
    parallel.barrier()

    # 10. Evaluate the fine-tuned model, and write the summary last: its presence means success.
    final_metrics = {}
    if val_tokens:
        final_metrics = _scalars(evaluate(model, unwrap(train_module), tokenizer, renderer, val_examples,
                                          val_tokens, spec.evaluation, batch_size=eval_batch, precision=precision,
                                          parallel=parallel), keep_samples=True)
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
        "train_loss": losses[-1] if losses else None,
        "train_loss_last_10_mean": sum(tail) / len(tail) if tail else None,
        "tokens_seen": state["tokens_seen"],
        "trained_tokens": state["trained_tokens"],
        "trainable_parameters": trainable,
        "eval": {"base": base_metrics, "fine_tuned": final_metrics},
        "best_checkpoint": keeper.best,
        "output": output.name,
        "train_seconds": round(state["train_seconds"], 2),
        "wall_time_s": round(time.time() - started, 2),
        "world_size": parallel.world_size,
        "strategy": strategy,
        # What each rank held: FSDP's shards, DDP's replicas (checked against the memory planner).
        "ranks": parallel.gather({"rank": parallel.rank, **rank_memory(train_module, optimizer)}),
    }
    if parallel.is_main:
        write_json_atomic(job_dir / SUMMARY_FILE, summary)
        events.emit("job succeeded", kind="status", status="succeeded", summary=_scalars(summary))
    # Every rank leaves together: one that tears its process group down while another still uses it
    # can abort in the communication library's threads at exit.
    parallel.barrier()
    return summary


def _check_layout(path: Path, saved: dict, strategy: str, world_size: int) -> None:
    """A checkpoint is laid out by the strategy that wrote it: whole (one process, DDP), FSDP shards
    (loadable by any number of ranks) or ZeRO partitions (only by as many ranks as wrote them)."""
    def layout(name):
        return {"fsdp": "fsdp", "deepspeed": "deepspeed"}.get(name, "whole")

    then = saved.get("strategy", "single")
    if layout(then) != layout(strategy):
        raise SpecError(f"cannot resume from {path}: it was written with resources.strategy {then}, this run uses "
                        f"{strategy}; resume with the strategy that wrote it")
    if strategy == "deepspeed" and saved.get("world_size") != world_size:
        raise SpecError(f"cannot resume from {path}: DeepSpeed wrote it with {saved.get('world_size')} processes, "
                        f"this run has {world_size}")


def _scalars(metrics: dict, *, keep_samples: bool = False) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float, str)) or v is None or (keep_samples and k == "samples")}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "no metrics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.recipes.sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-dir", required=True, type=Path, help="job directory holding spec.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    args = parser.parse_args(argv)
    try:
        run(args.job_dir, progress=not args.no_progress)
    except Preempted as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_PREEMPTED
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # the failure event holds the reason; the traceback helps whoever debugs
        import traceback

        traceback.print_exc()
        print(f"error: the job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
