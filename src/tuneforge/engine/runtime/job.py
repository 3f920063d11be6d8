"""A recipe's run from start to end: the job directory, the process group, events, exit codes.

`recipe_main` is every recipe's command line and maps what happened to the exit codes of
spec/jobdir.py; `run_recipe` reads DIR/spec.json, joins the process group, installs the stop-request
watcher, runs the recipe on a RecipeJob and records a failure as the last event (with `retryable`,
which tells a crash from bad input even when torchrun turns every exit code into 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.data.batching import StepSchedule
from tuneforge.data.problems import DataError
from tuneforge.data.templating import TemplateError
from tuneforge.engine.alerts import AlertStop
from tuneforge.engine.base_models import ModelNotFound, needs_import, resolve_base_model
from tuneforge.engine.distributed import Distributed, Prepared, init_distributed, prepare, shutdown
from tuneforge.engine.events import EventReporter
from tuneforge.engine.micro_batch import pick_micro_batch
from tuneforge.engine.precision import Precision, PrecisionError, resolve_device, resolve_precision
from tuneforge.engine.preemption import Preempted, PreemptionWatcher
from tuneforge.engine.progress import ProgressDisplay, process_age
from tuneforge.engine.quiet import quiet_libraries
from tuneforge.engine.reporters import ReportingEvents, open_reporters
from tuneforge.engine.runtime.metrics import format_metrics
from tuneforge.engine.runtime.resume import ResumePoint, find_resume_point
from tuneforge.engine.weights import publish_final
from tuneforge.spec.hyperparameters import resolve_hyperparameters
from tuneforge.spec.job import JobSpec
from tuneforge.spec.jobdir import (
    ADAPTER_DIR,
    BASE_OF_ADAPTER,
    ENVIRONMENT_FILE,
    MERGED_BASE_DIR,
    CHECKPOINTS_DIR,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    MODEL_DIR,
    Evaluation,
    JobSummary,
    RankMemory,
    read_spec,
    write_json_atomic,
    write_resolved_spec,
    write_summary,
)
from tuneforge.spec.loader import SpecError

# Failures no restart can fix: the job exits EXIT_BAD_INPUT and its failure event says retryable: false.
# AlertStop: a monitoring alert with stop_job ended the job after its checkpoint; a restart would repeat it.
INPUT_ERRORS = (DataError, TemplateError, ModelNotFound, PrecisionError, SpecError, AlertStop)


def recipe_main(run: Callable[..., JobSummary], argv: list[str] | None, *, prog: str, description: str | None) -> int:
    """`python -m tuneforge.recipes.NAME --job-dir DIR`: run(DIR) and its exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
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
    return EXIT_OK


def run_recipe(job_dir: Path, recipe: Callable[[RecipeJob], JobSummary], *, progress: bool = True) -> JobSummary:
    """Run recipe on the job described by job_dir/spec.json; returns the summary it wrote."""
    started = time.time()
    quiet_libraries()
    spec = read_spec(job_dir)
    parallel = init_distributed(spec.resources.collective_timeout_s)
    if parallel.is_main:
        record_environment(job_dir)
    events = ReportingEvents(job_dir, enabled=parallel.is_main)  # + monitoring.reporters, opened by RecipeJob.start
    display = ProgressDisplay(enabled=progress and parallel.is_main)
    watcher = PreemptionWatcher.from_environment().install()
    try:
        spec = continue_from_adapter(spec, job_dir, parallel)
        return recipe(RecipeJob.start(job_dir, spec, parallel, events, display, watcher, started))
    except Preempted:
        raise
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        events.emit(f"job failed: {reason}", level="error", kind="status", status="failed", error=reason,
                    retryable=not isinstance(exc, INPUT_ERRORS))
        raise
    finally:
        events.close()
        display.close()
        watcher.uninstall()
        shutdown()


def record_environment(job_dir: Path) -> None:
    """The library versions this run uses, for the registry's lineage (reproducing a result needs them)."""
    import platform
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("tuneforge", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    write_json_atomic(job_dir / ENVIRONMENT_FILE, versions)


def continue_from_adapter(spec: JobSpec, job_dir: Path, parallel: Distributed) -> JobSpec:
    """A job that continues training a registered adapter trains its base with the adapter merged in
    (full precision, PEFT's merge), written once to DIR/base-merged by rank 0; other specs pass as they are."""
    adapter = Path(spec.model.base_model)
    if not (adapter / "adapter_config.json").is_file():
        return spec
    target = job_dir / MERGED_BASE_DIR
    if parallel.is_main and not (target / "config.json").is_file():
        _merge_adapter_chain(adapter, target)
    parallel.barrier()
    spec.model.base_model = str(target)
    return spec


def _merge_adapter_chain(adapter: Path, target: Path) -> None:
    """adapter merged into its base (itself an adapter on a base, down the lineage), saved to target."""
    import json
    import os
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.engine.base_models import resolve_base_model

    recorded = adapter / BASE_OF_ADAPTER
    config = json.loads((recorded if recorded.is_file() else adapter / "adapter_config.json").read_text())
    base = config.get("base_model") or config.get("base_model_name_or_path") or ""
    if (Path(base) / "adapter_config.json").is_file():
        base_dir = target.with_name(target.name + "-base")
        if not (base_dir / "config.json").is_file():
            _merge_adapter_chain(Path(base), base_dir)
    else:
        base_dir = resolve_base_model(base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base_dir)
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)


@dataclass
class RecipeJob:
    """One run of a recipe: its job directory and spec, the hardware it got, and the runtime's services."""

    job_dir: Path
    spec: JobSpec  # the submitted spec until `resolved` replaces it with the resolved one
    parallel: Distributed
    events: EventReporter
    display: ProgressDisplay
    watcher: PreemptionWatcher
    started: float
    device: torch.device
    precision: Precision
    strategy: str  # single, ddp, fsdp or deepspeed
    # Start-up phases, reported with the first step: what a user waits for before training starts.
    startup: dict = field(default_factory=dict)

    @classmethod
    def start(cls, job_dir: Path, spec: JobSpec, parallel: Distributed, events: EventReporter,
              display: ProgressDisplay, watcher: PreemptionWatcher, started: float) -> RecipeJob:
        """Hardware, precision and seeds, then the `running` event."""
        device = resolve_device(parallel.local_rank)
        precision = resolve_precision(spec.training.precision, device)
        strategy = spec.resources.strategy if parallel.enabled else "single"
        if strategy == "deepspeed":
            from tuneforge.launch.deepspeed import deepspeed_problem

            if problem := deepspeed_problem(spec):
                raise SpecError(problem)
        # Same seed on every rank: identical adapter initialization (FSDP shards each rank's own copy).
        seed_everything(spec.training.seed)
        if parallel.is_main and spec.monitoring.reporters:  # a missing package fails here, before any training
            events.attach(open_reporters(spec, job_dir))
        job = cls(job_dir, spec, parallel, events, display, watcher, started, device, precision, strategy,
                  {"imports_s": process_age(), "clock": time.perf_counter()})
        where = f"{parallel.world_size} processes ({strategy})" if parallel.enabled else device.type
        job.note(f"job started on {where} in {precision.name}", kind="status", status="running", device=str(device),
                 precision=precision.name, world_size=parallel.world_size, strategy=strategy)
        return job

    def note(self, message: str, **data) -> None:
        """A milestone: into the event log and onto the terminal."""
        self.events.emit(message, **data)
        self.display.message(message)

    def base_model_dir(self) -> Path:
        """The spec's base model as a local directory, imported or built into the model cache on first use by
        the main process alone (the others wait for it), with an event saying so."""
        base = self.spec.model.base_model
        with self.parallel.main_first():
            if needs_import(base):
                self.note(f"importing {base} into the model cache (first use only)", kind="model_import")
            return resolve_base_model(base)

    def phase(self, name: str) -> None:
        """The start-up phase `name` ends now."""
        now = time.perf_counter()
        self.startup[name] = round(now - self.startup["clock"], 3)
        self.startup["clock"] = now

    def report_startup(self) -> None:
        self.phase("first_step_s")
        phases = {k: v for k, v in self.startup.items() if k != "clock"}
        total = sum(v for v in phases.values() if v is not None)
        self.events.emit(f"first optimizer step {total:.1f}s after the process started", kind="startup",
                         to_first_step_s=round(total, 3), **phases)

    def resume_point(self) -> ResumePoint:
        """The newest checkpoint that verifies, the same on every rank (rank 0 decides)."""
        return find_resume_point(self.job_dir / CHECKPOINTS_DIR, self.parallel, self.note)

    def resolve_training(self, spec: JobSpec, *, examples: int, loss_module: torch.nn.Module, batcher, model_dir: Path,
                         packing: bool = False) -> JobSpec:
        """The "auto" hyperparameters from the data and the method (spec/hyperparameters.py), the
        micro-batch from the memory (engine/micro_batch.py), recorded by `resolved`. With packing, batch
        sizes count the batcher's rows."""
        rows = len(batcher) if packing else None
        spec = resolve_hyperparameters(spec, examples, num_rows=rows)
        if spec.training.per_device_batch_size == "auto":
            micro = pick_micro_batch(spec, loss_module=loss_module, batcher=batcher, model_dir=model_dir,
                                     parallel=self.parallel, device=self.device, precision=self.precision)
            spec = resolve_hyperparameters(spec, examples, num_rows=rows, micro_batch=micro)
        spec.training.packing = packing
        spec.training.padding_free = bool(getattr(batcher, "padding_free", False))
        return self.resolved(spec)

    def resolved(self, spec: JobSpec) -> JobSpec:
        """What this run really trains with, every "auto" filled in: into resolved_spec.json (spec.json,
        the submitted spec, never changes) and from now on `self.spec`."""
        spec = spec.model_copy(deep=True)
        spec.training.precision = self.precision.name
        if self.parallel.is_main:
            write_resolved_spec(self.job_dir, spec)
        self.spec = spec
        return spec

    def schedule(self, units: int) -> StepSchedule:
        """Which units go into which optimizer step, from the resolved training section."""
        cfg = self.spec.training
        return StepSchedule(units, examples_per_step=cfg.batch_size, seed=cfg.seed, num_epochs=cfg.num_epochs,
                            max_steps=cfg.max_steps)

    def prepare(self, loss_module: torch.nn.Module, model: torch.nn.Module, *, total_steps: int,
                weights_dir: Path | None = None) -> Prepared:
        """The strategy's module, optimizer and schedule (engine.distributed.prepare) on the resolved spec;
        weights_dir: where a base built without weights (engine/sharded_loading.py) reads its shards."""
        resources = self.spec.resources
        if self.strategy == "fsdp" and resources.cpu_offload and self.device.type == "cpu":
            self.note("resources.cpu_offload has no effect when training on CPUs: the shards already live in host "
                      "memory", level="warning", kind="cpu_offload_ignored")
        return prepare(loss_module, model, spec=self.spec, strategy=self.strategy, parallel=self.parallel,
                       precision=self.precision, total_steps=total_steps, weights_dir=weights_dir)

    def publish(self, model, tokenizer, prepared: Prepared, *, full: bool) -> str:
        """The final adapter (or model) where users and servers load it; returns its directory name."""
        output = self.job_dir / (MODEL_DIR if full else ADAPTER_DIR)
        # A sharded model is gathered into one state dict on rank 0 (collective) and written as one file.
        consolidated = prepared.final_state_dict(trainable_only=not full)
        if self.parallel.is_main:
            publish_final(model, tokenizer, output, state_dict=consolidated)
            self.note(f"saved the {'model' if full else 'adapter'} to {output.name}/", kind="artifact", path=output.name)
        del consolidated
        self.parallel.barrier()
        return output.name

    def finish(self, training, prepared: Prepared, *, evaluation: Evaluation, trainable_parameters: int, output: str,
               method: str | None = None, output_step: int | None = None, report: str | None = None) -> JobSummary:
        """The fine-tuned model's scores as an event, then the summary, written last (its presence means
        success), and the `succeeded` event."""
        scores = evaluation.fine_tuned.model_dump(exclude={"samples"}, exclude_none=True)
        if scores:
            self.note(f"fine-tuned model: {format_metrics(scores)}", kind="eval", model="fine-tuned",
                      step=training.steps, metrics=scores)
        ranks = self.parallel.gather({"rank": self.parallel.rank, **prepared.rank_memory()})
        progress = training.progress
        summary = JobSummary(
            method=method or self.spec.method, adapter=self.spec.adapter.type, base_model=self.spec.model.base_model,
            device=str(self.device), precision=self.precision.name, steps=training.steps,
            epochs=round(training.epochs, 4), train_loss=training.train_loss,
            train_loss_last_10_mean=training.last_10_mean, tokens_seen=progress.tokens_seen,
            trained_tokens=progress.trained_tokens, trainable_parameters=trainable_parameters, eval=evaluation,
            best_checkpoint=training.best, output=output, output_step=output_step, report=report,
            train_seconds=round(progress.train_seconds, 2),
            wall_time_s=round(time.time() - self.started, 2), world_size=self.parallel.world_size,
            strategy=self.strategy, ranks=[RankMemory(**rank) for rank in ranks],
        )
        if self.parallel.is_main:
            from tuneforge.export.deploy import run_deploy

            summary.deployment = run_deploy(self.job_dir, self.spec, output, self.note)  # deploy: in the spec
            write_summary(self.job_dir, summary)
            self.events.emit("job succeeded", kind="status", status="succeeded", summary=summary.scalars())
        # Every rank leaves together: one that tears its process group down while another still uses it
        # can abort in the communication library's threads at exit.
        self.parallel.barrier()
        return summary


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
