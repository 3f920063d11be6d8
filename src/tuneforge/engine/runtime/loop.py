"""The training loop every method shares: restore, step, report, evaluate, checkpoint, stop.

What a recipe brings: a batcher (units -> micro-batch tensors, `example_ids`, `unit_lengths`), a
step schedule over its units, the prepared model (engine.distributed.prepare) whose loss names its own
normalizer, and optionally a validation callable. Online RL brings an `experience` callable instead of
collating units: each step it turns the step's units (prompts) into an Experience (the rollout phase:
sample, score, advantages) that names the optimizer updates to run on it (PPO: epochs x mini-batches),
and the loop runs them with the same micro-batching, back-off, events, checkpoints and stops.
What the loop owns: the exact restore of a checkpoint, this rank's share of each step, the
out-of-memory back-off of the micro-batch (the step is redone in smaller pieces: same examples, same
result), metrics events and the progress display, periodic validation, and the decisions every rank
must take together (checkpoint now, stop now), a checkpoint at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

from tuneforge.data.batching import StepSchedule, micro_batches
from tuneforge.engine import faults
from tuneforge.engine.alerts import AlertMonitor, AlertStop
from tuneforge.engine.checkpoint import CheckpointKeeper, checkpoint_bytes, restore_training_checkpoint
from tuneforge.engine.distributed import Prepared
from tuneforge.engine.monitoring import MfuEstimator, SystemSampler, step_memory
from tuneforge.engine.preemption import Preempted
from tuneforge.engine.runtime.metrics import format_metrics
from tuneforge.engine.runtime.resume import ResumePoint
from tuneforge.engine.train_step import StepResult, optimizer_step
from tuneforge.spec.jobdir import CHECKPOINTS_DIR, BestCheckpoint


@dataclass
class Progress:
    """Counters that continue across resumes (saved in every checkpoint)."""

    tokens_seen: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainingResult:
    steps: int
    epochs: float
    progress: Progress
    best: BestCheckpoint | None
    losses: list[float] = field(default_factory=list)  # this run's, one per step

    @property
    def train_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def last_10_mean(self) -> float | None:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


@dataclass
class Experience:
    """One step's rollout phase, done: the optimizer updates to run on its rows (this rank's share).

    collate(rows) gives a micro-batch's tensors; the loop cuts each update into micro-batches of the
    current size (halved on out-of-memory: the update is redone, same rows, same result). An Experience
    must not draw from the global RNGs (sample with generators seeded from the step), so a resumed step
    rebuilds exactly the experience the uninterrupted run had."""

    updates: list[list[int]]  # optimizer steps, each the rows it trains on; the same count on every rank
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    tokens: int  # real tokens of the rollouts, every rank
    padded_tokens: int  # positions the rollouts computed, every rank
    metrics: dict[str, float] = field(default_factory=dict)  # the rollout's (reward, KL, response length)
    finish: Callable[[], dict[str, float]] | None = None  # after the updates: their metrics (clip fraction, ...)


def train(job, prepared: Prepared, batcher, schedule: StepSchedule, *, micro: int, resume: ResumePoint,
          data_position: dict[str, Any], recipe_state: dict[str, Any] | None = None,
          validate: Callable[[], dict[str, float]] | None = None,
          experience: Callable[[int, tuple[int, ...]], Experience] | None = None) -> TrainingResult:
    """Train from the resume point to schedule.total_steps. data_position: what the data order is a pure
    function of (equal values mean an exact resume); recipe_state: what the recipe keeps in checkpoints
    (read when a checkpoint is written, so a recipe may update it in place). experience(step, units):
    online RL's rollout phase for this rank's units of the step (see Experience)."""
    loop = _Loop(job, prepared, batcher, schedule, micro, data_position, recipe_state or {}, validate, experience)
    loop.restore(resume)
    job.phase("setup_s")
    interval = job.spec.monitoring.sample_interval_s
    if interval and job.parallel.is_main:  # only the main rank writes events; it samples every visible GPU
        loop.sampler = SystemSampler(interval, use_gpus=job.device.type == "cuda").start()
    try:
        return loop.run()
    finally:
        if loop.sampler is not None:
            loop.sampler.stop()


class _Loop:
    def __init__(self, job, prepared: Prepared, batcher, schedule: StepSchedule, micro: int,
                 data_position: dict[str, Any], recipe_state: dict[str, Any], validate, experience=None):
        self.job, self.prepared, self.batcher, self.schedule, self.micro = job, prepared, batcher, schedule, micro
        self.data_position, self.recipe_state, self.validate = data_position, recipe_state, validate
        self.experience = experience
        self.progress, self.start_step, self.losses = Progress(), 0, []
        self.resumed_seconds = 0.0  # the training seconds the checkpoint carried, not this process's
        self.last_eval: dict[str, float] = {}
        self.keeper: CheckpointKeeper | None = None
        # A rank whose share of a step is short runs this with weight 0 (same collectives on every rank).
        self.stand_in = batcher.collate((0,)) if job.parallel.enabled and experience is None else None
        # monitoring: alerts on every step, MFU (not for online RL, whose steps are mostly generation), system samples
        self.alerts = AlertMonitor(job.spec.monitoring.alerts, job.events.emit)
        self.mfu = None if experience else MfuEstimator(job.spec, job.device, job.precision.name, job.parallel.world_size)
        self.sampler: SystemSampler | None = None
        self.process = psutil.Process()

    def restore(self, resume: ResumePoint) -> None:
        """Weights, optimizer, scheduler, scaler, RNGs and counters, exactly as the checkpoint saved them."""
        job, spec = self.job, self.job.spec
        if resume.path is not None:
            resume.check(data_position=self.data_position, strategy=job.strategy, world_size=job.parallel.world_size)
            p = self.prepared
            restore_training_checkpoint(resume.path, model=p.state_module, optimizer=p.optimizer, scheduler=p.scheduler,
                                        scaler=p.scaler, parallel=job.parallel)
            self.start_step = resume.step
            self.progress = Progress(**{k: resume.saved[k] for k in asdict(Progress()) if k in resume.saved})
            self.resumed_seconds = self.progress.train_seconds
            job.note(f"resumed from {resume.path.name} at step {self.start_step}", kind="resumed", step=self.start_step,
                     path=resume.path.name)
        self.keeper = CheckpointKeeper(job.job_dir / CHECKPOINTS_DIR, every_steps=spec.checkpoint.every_steps,
                                       every_minutes=spec.checkpoint.every_minutes, keep_last=spec.checkpoint.keep_last,
                                       resumed_from=resume.path, best=resume.saved.get("best"),
                                       objective=spec.checkpoint.objective(spec.evaluation),
                                       save_new_best=spec.checkpoint.best_by is not None or spec.checkpoint.output == "best")

    def run(self) -> TrainingResult:
        job, schedule = self.job, self.schedule
        job.display.start(schedule.total_steps, self.start_step)
        began = time.monotonic() - self.progress.train_seconds
        for step in range(self.start_step, schedule.total_steps):
            started = time.perf_counter()
            plan = schedule.plan(step)
            result = self.step(plan.step, plan.example_ids)
            tokens_per_second = result.tokens / (time.perf_counter() - started)
            done = step + 1
            self.progress.tokens_seen += result.tokens
            self.progress.trained_tokens += result.loss_units
            self.progress.train_seconds = time.monotonic() - began
            self.losses.append(result.loss)
            if done == self.start_step + 1:
                job.report_startup()
            self.report(done, result, tokens_per_second, plan.example_ids)
            faults.after_step(done)
            if done < schedule.total_steps:
                self.between_steps(done, result)
        final = schedule.total_steps
        # The last step is validated too (when validation runs during training), so it competes for best.
        fresh = self.validate_now(final) if job.spec.evaluation.eval_every_steps and final > self.start_step else {}
        self.checkpoint(final, {"train_loss": self.losses[-1] if self.losses else None, **fresh})
        best = BestCheckpoint(**self.keeper.best) if self.keeper.best else None
        return TrainingResult(final, schedule.epoch_at(final), self.progress, best, self.losses)

    def step(self, index: int, example_ids: tuple[int, ...]) -> StepResult:
        """This rank's share of one schedule step: one optimizer step over its units, or with an
        experience callable, its rollout phase and then the optimizer updates it names."""
        mine, per_rank = self.job.parallel.shard(list(example_ids))
        if self.experience is None:
            return self.update(index, mine, per_rank, self.batcher.collate)
        experience = self.experience(index, tuple(mine))
        results = [self.update(index, rows, len(rows), experience.collate) for rows in experience.updates]
        metrics = {**experience.metrics, **(experience.finish() if experience.finish else {})}
        return _combined(results, experience, metrics)

    def update(self, index: int, units: list, per_rank: int, collate) -> StepResult:
        """One optimizer step on this rank's units, redone in halved micro-batches on out-of-memory."""
        job, p = self.job, self.prepared
        while True:
            batches = [collate(list(part)) for part in micro_batches(tuple(units), self.micro)]
            try:
                return optimizer_step(p.train_module, batches, optimizer=p.optimizer, scheduler=p.scheduler,
                                      scaler=p.scaler, precision=job.precision,
                                      max_grad_norm=job.spec.training.max_grad_norm, parameters=p.parameters,
                                      parallel=job.parallel, micro_batches=p.passes(per_rank, self.micro),
                                      stand_in=self.stand_in)
            except torch.OutOfMemoryError:
                # Nothing was stepped yet: drop the partial gradients and redo the step in smaller pieces.
                p.optimizer.zero_grad(set_to_none=True)
                if job.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro == 1 or job.parallel.enabled:  # the other ranks are already in the next collective
                    raise
                self.micro //= 2
                job.note(f"out of memory at step {index + 1}; continuing with micro-batches of {self.micro}",
                         level="warning", kind="micro_batch", step=index + 1, per_device_batch_size=self.micro)

    def report(self, done: int, result: StepResult, tokens_per_second: float, example_ids) -> None:
        job, total = self.job, self.schedule.total_steps
        self.alerts.observe_step(done, result.loss, tokens_per_second)
        if done % job.spec.training.logging_steps == 0 or done == total:
            job.events.metrics(
                f"step {done}/{total}: train_loss={result.loss:.4f}",
                step=done, total_steps=total, epoch=round(self.schedule.epoch_at(done), 4),
                train_loss=result.loss,
                # The loss names what its accuracy counts (next tokens; DPO: rewards_accuracies; None: nothing, as
                # online RL's) and what else it measured.
                **({f"train_{accuracy}": result.accuracy}
                   if (accuracy := getattr(self.prepared.eval_module(), "accuracy_metric", "mean_token_accuracy"))
                   else {}),
                **{f"train_{name}": value for name, value in result.metrics.items()},
                learning_rate=result.learning_rate, grad_norm=result.grad_norm, tokens_per_second=tokens_per_second,
                tokens_seen=self.progress.tokens_seen, real_token_fraction=result.tokens / result.padded_tokens,
                example_ids=self.batcher.example_ids(example_ids),
                **self.system_metrics(result, len(example_ids), tokens_per_second),
            )
        # This process's pace: a resumed run's counters hold the earlier attempts' seconds too.
        eta = (total - done) * (self.progress.train_seconds - self.resumed_seconds) / max(1, done - self.start_step)
        job.display.update(done, loss=result.loss, learning_rate=result.learning_rate,
                           tokens_per_second=tokens_per_second, eta_s=eta)

    def system_metrics(self, result: StepResult, rows: int, tokens_per_second: float) -> dict[str, float]:
        """MFU, this process's memory, and the system samples since the last metrics event."""
        values: dict[str, float] = dict(step_memory(self.job.device, self.process))
        if self.mfu is not None and (mfu := self.mfu.mfu(tokens_per_second, result.padded_tokens / max(rows, 1))):
            values["mfu"] = round(mfu, 5)
        if self.sampler is not None:
            values.update(self.sampler.take())
        return values

    def between_steps(self, done: int, result: StepResult) -> None:
        """Validate when due; checkpoint and stop when any rank asks (every rank takes the same decision)."""
        job = self.job
        every = job.spec.evaluation.eval_every_steps
        fresh = self.validate_now(done) if every and done % every == 0 else {}
        # A checkpoint carries the validation of its own step only, so the best is judged on its weights.
        metrics = {"train_loss": result.loss, **fresh}
        # Time-based checkpoints and stop requests can differ between ranks: any rank's wins for all.
        # So are alerts that stop the job (throughput is each rank's own).
        due, stop, halt = (bool(v) for v in job.parallel.sum([float(self.keeper.due(done)), float(job.watcher.requested),
                                                              float(self.alerts.stop_reason is not None)]))
        # With checkpoint.best_by (or output best) a new best is saved at once (every rank has the same
        # validation results, so decides the same).
        if due or stop or halt or self.keeper.new_best_to_save(metrics):
            self.checkpoint(done, metrics)
        if halt:
            raise AlertStop(f"stopped after step {done} with a checkpoint: "
                            f"{self.alerts.stop_reason or 'an alert of another rank'}")
        if stop:
            job.note(f"preempted ({job.watcher.reason}) after step {done}; checkpoint saved, the job resumes from it",
                     level="warning", kind="status", status="preempted", step=done, reason=job.watcher.reason)
            raise Preempted(done, job.watcher.reason)

    def validate_now(self, done: int) -> dict[str, float]:
        """The validation metrics at this step as an event; returns them as valid_NAME."""
        if self.validate is None:
            return {}
        job = self.job
        self.last_eval = self.validate()
        self.alerts.observe_eval(done, self.last_eval)
        message = f"step {done}: {format_metrics(self.last_eval)}"
        fresh = {f"valid_{k}": v for k, v in self.last_eval.items()}
        job.events.metrics(message, step=done, total_steps=self.schedule.total_steps, **fresh)
        job.display.message(message)
        return fresh

    def checkpoint(self, step: int, metrics: dict) -> None:
        job, p = self.job, self.prepared
        state = {**asdict(self.progress), "epoch": self.schedule.epoch_at(step), "data_position": self.data_position,
                 "metrics": metrics, **self.recipe_state, "strategy": job.strategy,
                 "world_size": job.parallel.world_size}
        path, is_best = self.keeper.save(step, model=p.state_module, optimizer=p.optimizer, scheduler=p.scheduler,
                                         scaler=p.scaler, parallel=job.parallel, sharded=p.sharded, trainer_state=state)
        if job.parallel.is_main:
            job.events.emit(f"checkpoint at step {step}", kind="checkpoint", step=step,
                            path=f"{CHECKPOINTS_DIR}/{path.name}", bytes=checkpoint_bytes(path), metrics=metrics,
                            is_best=is_best)


def _combined(results: list[StepResult], experience: Experience, metrics: dict[str, float]) -> StepResult:
    """One schedule step of online RL as one result: the mean loss of its updates, the rollout's tokens,
    the learning rate of its first update, the largest gradient norm, and the method's metrics."""
    norms = [r.grad_norm for r in results if r.grad_norm is not None]
    units = sum(r.loss_units for r in results)
    return StepResult(
        loss=sum(r.loss for r in results) / max(len(results), 1),
        accuracy=sum(r.accuracy * r.loss_units for r in results) / max(units, 1),
        tokens=experience.tokens,
        padded_tokens=max(experience.padded_tokens, 1),
        loss_units=units,
        grad_norm=max(norms) if norms else None,
        learning_rate=results[0].learning_rate if results else 0.0,
        metrics=metrics,
    )
