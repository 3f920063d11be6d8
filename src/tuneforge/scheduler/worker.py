"""The worker: claims jobs that fit its nodes, launches their recipes through an executor, and tends them.

Each tick, for every job it runs: tail events.jsonl into the database (events, metrics, checkpoints),
copy the recipe's resolved_spec.json onto the job row, check the job's status (a cancel or pause from
the API stops the recipe with SIGTERM, on which it writes a checkpoint), renew its lease, and when the
recipe exits, read its outcome (launch/outcome.py, the same reading as `tuneforge train`'s): succeeded
(register the model), a crash (restarted in place from its last checkpoint while the job has
checkpoint.max_restarts left, then failed with the recipe's own error), bad input (failed, never
retried), or preempted (re-queued). Then it claims new jobs while it has free GPUs (or CPU slots). On
SIGTERM it stops its recipes the same way and re-queues their jobs, so another worker resumes them from
their checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.db import evals as eval_rows
from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.db import workers as worker_rows
from tuneforge.db.identifiers import new_id
from tuneforge.db.job_events import add_event, ingest
from tuneforge.db.session import Database
from tuneforge.home import tuneforge_home
from tuneforge.launch.capabilities import host_reporters
from tuneforge.launch.outcome import (
    BAD_INPUT,
    PREEMPTED,
    SUCCEEDED,
    RecipeOutcome,
    RecipeReport,
    describe_exit,
    interpret,
)
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.checkpoints import model_of as checkpoint_model
from tuneforge.registry.checkpoints import parse_checkpoint_id
from tuneforge.registry.exports import register_export
from tuneforge.registry.models import (RegistryError, fine_tuned_model_id, materialize_source, model_source,
                                      register_job_output)
from tuneforge.registry.versions import ManifestMismatch
from tuneforge.registry.storage import job_files
from tuneforge.registry.storage import jobs as job_storage
from tuneforge.registry.storage.tenant_store import open_tenant_store
from tuneforge.scheduler import cost, states
from tuneforge.planner.cost import price_table
from tuneforge.scheduler.executors import Executor, LaunchError, Run, job_root_shared
from tuneforge.scheduler.launch import RECIPE_LOG, materialize_spec, prepare_job_dir
from tuneforge.scheduler.loop import run_until_stopped, stop_on_signals
from tuneforge.scheduler.queue import claim_next
from tuneforge.scheduler.stalls import is_stalled, no_progress_rule, record_progress_resumed, record_stall
from tuneforge.scheduler.tailer import read_new_events
from tuneforge.settings import Settings
from tuneforge.spec.api import CANCELLED, PAUSED, RUNNING
from tuneforge.spec.evals import read_output_items
from tuneforge.spec.job import JobSpec
from tuneforge.spec.openai_jobs import registered_models
from tuneforge.spec.jobdir import (
    EVENTS_FILE,
    RESOLVED_SPEC_FILE,
    SUMMARY_FILE,
    JobSummary,
    read_resolved_spec,
    read_summary,
)

log = logging.getLogger("tuneforge.worker")


@dataclass
class Attempt:
    """One job attempt this worker holds the lease for."""

    job_id: str
    tenant_id: str
    attempt: int
    spec: JobSpec  # with local paths
    job_dir: Path
    nodes: tuple[tuple[int, int], ...]
    gpus: int
    started: float
    last_renewal: float
    events_offset: int = 0
    restarts: int = 0  # the job's crash restarts so far (the job row's count)
    run: Run | None = None
    stop_reason: str | None = None  # cancelled | paused | lost | superseded | shutdown
    stop_sent_at: float | None = None
    report: RecipeReport = field(default_factory=RecipeReport)  # what the running recipe said about itself
    resolved_mtime: int | None = None  # of the resolved_spec.json last copied onto the job
    gpu_seconds: float = 0.0  # used by this attempt's earlier runs (before a crash restart)
    log_offset: int = 0  # where this run's output starts in recipe.log (earlier runs append to it too)
    last_progress: float = 0.0  # when the running recipe last reported a step (or was launched): no_progress alert
    stalled: bool = False  # the no_progress alert is firing
    accounted_until: float = 0.0  # this run's device time up to here is in usage_records (scheduler/cost.py)
    budget_problem: str | None = None  # why the job was stopped for its budget


class Worker:
    def __init__(self, db: Database, settings: Settings, executor: Executor, *, worker_id: str | None = None):
        self.db, self.settings, self.executor = db, settings, executor
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id('')[:6]}"
        self.store = LocalArtifactStore.from_settings(settings)  # sealed uploads: staged decrypted into DIR/inputs
        self.tenant_store = open_tenant_store(db, settings)  # None: jobs read the blobs under artifacts_dir
        self.nodes = executor.inventory()
        self.strategies = executor.strategies()
        self.reporters = host_reporters()  # monitoring.reporters this environment has (the recipes run in it)
        price_table()  # a bad TUNEFORGE_PRICE_TABLE stops the worker here, not while it prices a job
        self.attempts: dict[str, Attempt] = {}
        self.draining = False
        self._last_seen = 0.0

    # ---- the loop ---------------------------------------------------------------------------------

    def run_once(self) -> None:
        now_s = time.time()
        if now_s - self._last_seen >= self.settings.heartbeat_seconds:
            self._announce(now_s)
        for attempt in list(self.attempts.values()):
            self._tend(attempt, time.time())
        if not self.draining:
            self._claim(time.time())

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        stop_on_signals(stop)
        run_until_stopped(self.run_once, interval=self.settings.poll_seconds, stop=stop)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every recipe (they checkpoint on SIGTERM), wait for them, and re-queue their jobs."""
        self.draining = True
        for attempt in self.attempts.values():
            self._stop(attempt, "shutdown")
        while self.attempts:
            for attempt in list(self.attempts.values()):
                self._tend(attempt, time.time())
            time.sleep(min(self.settings.poll_seconds, 0.5))
        with self.db.session() as session:
            worker_rows.stop_worker(session, worker_id=self.worker_id)

    # ---- claiming and launching ------------------------------------------------------------------

    def free(self) -> list[int]:
        free = [node.gpus for node in self.nodes]
        for attempt in self.attempts.values():
            for index, gpus in attempt.nodes:
                free[index] -= gpus
        return free

    def _announce(self, now_s: float) -> None:
        with self.db.session() as session:
            shared = job_root_shared(self.executor.kind, self.settings)
            inventory = [{"gpu_type": n.gpu_type, "gpus": n.gpus, "strategies": self.strategies,
                          "reporters": self.reporters, "shared_job_root": shared} for n in self.nodes]
            worker_rows.register_worker(
                session, worker_id=self.worker_id, hostname=socket.gethostname(), executor=self.executor.kind, inventory=inventory
            )
        self._last_seen = now_s

    def _claim(self, now_s: float) -> None:
        while any(f > 0 for f in self.free()):
            with self.db.session() as session:
                claimed = claim_next(
                    session, worker_id=self.worker_id, nodes=self.nodes, free=self.free(), strategies=self.strategies,
                    lease_seconds=self.settings.lease_seconds, now_s=now_s, reserve_after=self.settings.reserve_after_seconds,
                )
                if claimed is None:
                    return
                spec = JobSpec.model_validate(claimed.spec)
                ids = [] if spec.method == "export" else (  # an export job reads no data
                    [spec.dataset.path] + ([spec.dataset.validation_path] if spec.dataset.validation_path else []))
                contents = {fid: self.store.find_content(session, tenant_id=claimed.tenant_id, sha256=row.sha256, holder=fid)
                            for fid, row in file_rows.files_by_id(session, file_ids=ids).items()}
                models = {model_id: row for _, model_id in registered_models(spec)  # a checkpoint: its model's row
                          if (row := model_rows.get_model(session, tenant_id=claimed.tenant_id,
                                                          model_id=checkpoint_model(model_id)))}
                try:  # what the job trains from, through an adapter's lineage down to its base
                    base_source = model_source(session, tenant_id=claimed.tenant_id, base_model=spec.model.base_model,
                                               home=tuneforge_home())
                except RegistryError as exc:
                    base_source = exc
                try:  # a kept checkpoint as a reward or judge model: assembled as a checkpoint base model is
                    checkpoints = {model_id: model_source(session, tenant_id=claimed.tenant_id, base_model=model_id,
                                                          home=tuneforge_home())
                                   for where, model_id in registered_models(spec)
                                   if where != "model.base_model" and parse_checkpoint_id(model_id) is not None}
                except RegistryError as exc:
                    checkpoints = exc
                row = job_rows.get_job_any_tenant(session, job_id=claimed.job_id)
                offset, restarts = row.events_offset, row.restarts or 0
            job_dir = self.settings.jobs_dir / claimed.job_id
            attempt = Attempt(
                job_id=claimed.job_id, tenant_id=claimed.tenant_id, attempt=claimed.attempt, spec=spec, job_dir=job_dir,
                nodes=claimed.nodes, gpus=claimed.gpus, started=now_s, last_renewal=now_s, events_offset=offset,
                restarts=restarts,
            )
            self.attempts[claimed.job_id] = attempt
            try:
                # Decrypted into DIR/inputs until the run ends: from the object store, or the sealed artifact folder.
                blobs = job_storage.stage_inputs(self.tenant_store, self.store, tenant_id=claimed.tenant_id,
                                                 contents=contents, job_dir=job_dir)
                missing = [fid for fid in ids if fid not in blobs or not blobs[fid].is_file()]
                if missing:
                    raise LaunchError(f"the data of {', '.join(missing)} is missing from the artifact store")
                gone = [model_id for _, model_id in registered_models(spec) if model_id not in models]
                if gone:
                    raise LaunchError(f"the model {gone[0]} this job uses was deleted")
                for unavailable in (base_source, checkpoints):
                    if isinstance(unavailable, RegistryError):
                        raise LaunchError(unavailable.message)
                if self.tenant_store is not None:  # a version another machine made: its files from the object store
                    job_storage.stage_registered_model(self.tenant_store, self.store, tenant_id=claimed.tenant_id,
                                                       source=base_source)
                # A tenant's version, with encryption at rest, is decrypted into this job's inputs (removed with them
                # when the run ends), never into the shared TUNEFORGE_HOME/registry cache.
                private = job_dir / job_storage.INPUTS_DIR / "models" if self.settings.encrypt_at_rest else None
                base_model = materialize_source(self.store, base_source, tuneforge_home() / "registry", db=self.db,
                                                private_root=private, object_store=self.tenant_store)
                model_dirs = {**self._model_dirs(attempt, {k: row for k, row in models.items() if k not in checkpoints}),
                              **self._checkpoint_dirs(attempt, checkpoints, private_root=private)}
                attempt.spec = materialize_spec(spec, blobs, model_dirs, base_model=base_model)
                prepare_job_dir(job_dir, attempt.spec)
            except (LaunchError, OSError, ManifestMismatch, job_files.SealedFileRefused) as exc:
                job_storage.remove_inputs(job_dir)  # what this claim decrypted before the failure (data, a model)
                self._launch_failed(attempt, str(exc))
                continue
            self._launch(attempt)

    def _model_dirs(self, attempt: Attempt, models: dict) -> dict[str, Path]:
        """The folders of the registered models a job uses (a reward model, a judge, the model it evaluates or
        exports): each one's job output, decrypted into this job's inputs when it is sealed at rest."""
        home, found = tuneforge_home(), {}
        for model_id, row in models.items():
            output = home / row.location
            found[model_id] = job_files.plaintext_folder(
                self.db, self.store.keys, tenant_id=attempt.tenant_id, job_id=row.job_id, job_dir=output.parent,
                # Named by the model, not per attempt: the path goes into the spec, which a re-attempt must not change.
                part=output.name, dest=attempt.job_dir / job_storage.INPUTS_DIR / "models" / f"{row.job_id}-{output.name}")
        return found

    def _checkpoint_dirs(self, attempt: Attempt, checkpoints: dict, *, private_root: Path | None) -> dict[str, Path]:
        """The kept checkpoints a job uses as reward or judge models, each assembled from its version's files and
        its weights (decrypted into this job's inputs with encryption at rest), as a checkpoint base model is."""
        found = {}
        for model_id, source in checkpoints.items():
            if self.tenant_store is not None:  # the version's files, when another machine made it
                job_storage.stage_registered_model(self.tenant_store, self.store, tenant_id=attempt.tenant_id,
                                                   source=source)
            found[model_id] = Path(materialize_source(self.store, source, tuneforge_home() / "registry", db=self.db,
                                                      private_root=private_root, object_store=self.tenant_store))
        return found

    def _launch(self, attempt: Attempt) -> None:
        try:
            attempt.log_offset = (attempt.job_dir / RECIPE_LOG).stat().st_size
        except OSError:
            attempt.log_offset = 0
        if self.store.keys is not None:  # a run that resumes reads its checkpoints as the recipe wrote them
            try:
                job_files.unseal_job_dir(self.db, self.store.keys, tenant_id=attempt.tenant_id, job_id=attempt.job_id,
                                         job_dir=attempt.job_dir)
            except (job_files.SealedFileRefused, OSError) as exc:
                self._launch_failed(attempt, f"the job's checkpoints cannot be resumed from: {exc}")
                return
        try:
            attempt.run = self.executor.launch(
                job_id=attempt.job_id, attempt=attempt.attempt, job_dir=attempt.job_dir, spec=attempt.spec,
                placement={"nodes": attempt.nodes}, restart=attempt.restarts,
            )
        except LaunchError as exc:
            self._launch_failed(attempt, str(exc))
            return
        if attempt.run is not None:
            attempt.started = attempt.accounted_until = attempt.last_progress = time.time()
            log.info("job %s attempt %d started", attempt.job_id, attempt.attempt)

    def _launch_failed(self, attempt: Attempt, message: str) -> None:
        if self.settings.encrypt_at_rest:  # what an earlier run left (its checkpoints) stays sealed
            self._seal_outputs(attempt)
        with self.db.session() as session:
            states.fail(session, job_id=attempt.job_id, attempt=attempt.attempt,
                        error={"code": "launch_failed", "param": None, "message": self._redact(message, attempt)})
            states.release_lease(session, job_id=attempt.job_id, worker_id=self.worker_id)
        self.attempts.pop(attempt.job_id, None)

    # ---- tending a running job --------------------------------------------------------------------

    def _tend(self, attempt: Attempt, now_s: float) -> None:
        if attempt.run is None:
            if attempt.stop_reason is None:
                self._launch(attempt)  # the previous attempt may have let go of the directory by now
            if attempt.run is None:
                self._check(attempt, now_s)
                if attempt.stop_reason is not None:
                    self._finish(attempt, None)
                return
        self._ingest(attempt)
        self._watch_progress(attempt, now_s)
        self._check(attempt, now_s)
        code = attempt.run.poll()
        if code is None:
            if attempt.stop_sent_at and now_s - attempt.stop_sent_at > self.settings.stop_grace_seconds:
                attempt.run.kill()
            return
        self._ingest(attempt)
        self._finish(attempt, code)

    def _ingest(self, attempt: Attempt) -> None:
        self._copy_resolved_spec(attempt)
        events, offset = read_new_events(attempt.job_dir / EVENTS_FILE, attempt.events_offset)
        if offset == attempt.events_offset:
            return
        for event in events:
            attempt.report.observe(event)
        stepped = any(e.get("type") == "metrics" and isinstance((e.get("data") or {}).get("step"), int) for e in events)
        with self.db.session() as session:
            stored = ingest(session, job_id=attempt.job_id, attempt=attempt.attempt, worker_id=self.worker_id,
                            events=events, offset=offset)
        if stored:
            attempt.events_offset = offset
            if stepped:
                attempt.last_progress = time.time()
        else:
            self._stop(attempt, "lost")

    def _watch_progress(self, attempt: Attempt, now_s: float) -> None:
        """The no_progress alert (scheduler/stalls.py): fired once per stall, cleared when steps resume."""
        rule = no_progress_rule(attempt.spec)
        if rule is None or attempt.stop_reason is not None:  # a recipe being stopped owes no more steps
            return
        stalled = is_stalled(rule, last_progress=attempt.last_progress, now_s=now_s)
        if stalled == attempt.stalled:
            return
        with self.db.session() as session:
            if stalled:
                record_stall(session, job_id=attempt.job_id, attempt=attempt.attempt, rule=rule,
                             step=attempt.report.last_step)
            else:
                record_progress_resumed(session, job_id=attempt.job_id, step=attempt.report.last_step)
        attempt.stalled = stalled

    def _copy_resolved_spec(self, attempt: Attempt) -> None:
        """resolved_spec.json onto the job row, once the recipe has written it (again when it rewrites it)."""
        try:
            mtime = (attempt.job_dir / RESOLVED_SPEC_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == attempt.resolved_mtime:
            return
        try:
            resolved = read_resolved_spec(attempt.job_dir)
        except ValueError:  # half of a file that is not ours to write: the next tick reads it again
            return
        if resolved is not None:
            with self.db.session() as session:
                job_rows.record_resolved_spec(session, job_id=attempt.job_id, attempt=attempt.attempt, resolved=resolved)
            attempt.resolved_mtime = mtime

    def _check(self, attempt: Attempt, now_s: float) -> None:
        """Renew the lease when due, and stop the recipe when the job was cancelled, paused or taken over."""
        with self.db.session() as session:
            if now_s - attempt.last_renewal >= self.settings.heartbeat_seconds:
                if not states.renew_lease(session, job_id=attempt.job_id, worker_id=self.worker_id,
                                          lease_until=now_s + self.settings.lease_seconds):
                    self._stop(attempt, "lost")
                    return
                attempt.last_renewal = now_s
                self._account(session, attempt, now_s)
            job = job_rows.get_job_any_tenant(session, job_id=attempt.job_id)
        if job is None or job.lease_owner != self.worker_id:
            self._stop(attempt, "lost")
        elif job.attempt != attempt.attempt:
            self._stop(attempt, "superseded")
        elif job.status in (CANCELLED, PAUSED):
            self._stop(attempt, job.status)
        elif job.status != RUNNING:
            self._stop(attempt, "superseded")

    def _account(self, session, attempt: Attempt, now_s: float) -> None:
        """Price the device time since the last heartbeat, then stop the job if that spent its budget."""
        if attempt.run is None:
            return
        self._record_usage(session, attempt, now_s)
        problem = cost.running_budget_problem(session, job_id=attempt.job_id, tenant_id=attempt.tenant_id,
                                              spec=attempt.spec, now_s=now_s)
        if problem and attempt.stop_reason is None:
            attempt.budget_problem = problem
            add_event(session, job_id=attempt.job_id, level="warn", data={"kind": "budget", "reason": problem},
                      message=f"Budget spent ({problem}); stopping the job at a checkpoint")
            self._stop(attempt, "budget")

    def _record_usage(self, session, attempt: Attempt, now_s: float) -> None:
        device = self.nodes[attempt.nodes[0][0]].gpu_type if attempt.nodes else "cpu"
        cost.record_usage(session, job_id=attempt.job_id, tenant_id=attempt.tenant_id, device=device,
                          devices=attempt.gpus, start_s=attempt.accounted_until, end_s=now_s)
        attempt.accounted_until = max(attempt.accounted_until, now_s)

    def _stop(self, attempt: Attempt, reason: str) -> None:
        if attempt.stop_reason is None:
            attempt.stop_reason = reason
            log.info("stopping job %s attempt %d: %s", attempt.job_id, attempt.attempt, reason)
        if attempt.run is not None and attempt.stop_sent_at is None:
            attempt.run.terminate()
            attempt.stop_sent_at = time.time()

    # ---- outcome ------------------------------------------------------------------------------------

    def _finish(self, attempt: Attempt, code: int | None) -> None:
        outcome = self._outcome(attempt, code)
        if attempt.stop_reason is None and outcome is not None and self._restart(attempt, outcome):
            return
        summary = self._summary(attempt) if outcome is not None and outcome.status == SUCCEEDED else None
        if summary is not None and self.tenant_store is not None and attempt.stop_reason in (None, PAUSED):
            summary = self._publish(attempt, summary)
        # Lost or superseded: another worker's run may be in this directory now; leave its files alone.
        ours = attempt.stop_reason not in ("lost", "superseded")
        sealing = self.settings.encrypt_at_rest and ours
        succeeding = summary is not None and attempt.stop_reason in (None, PAUSED)  # its outputs are registered next
        if sealing:  # before the job can be claimed again (re-queued, paused): a new run unseals what it resumes from
            self._seal_outputs(attempt, parts=job_files.RESUME_PARTS if succeeding else job_files.SEALED_PARTS)
        # Before the state change too: once re-queued, another worker may stage fresh inputs in this directory.
        if ours:
            job_storage.remove_inputs(attempt.job_dir)  # no decrypted copy outlives the run
            if self.settings.encrypt_at_rest:  # nor the base a continued job merged its sealed adapter into
                job_storage.remove_merged_bases(attempt.job_dir)
        used = attempt.gpu_seconds + self._run_seconds(attempt)
        with self.db.session() as session:
            if attempt.run is not None:
                self._record_usage(session, attempt, time.time())
            states.release_lease(session, job_id=attempt.job_id, worker_id=self.worker_id, gpu_seconds=used)
            reason = attempt.stop_reason
            if summary is not None and reason in (None, PAUSED):
                self._succeed(session, attempt, summary)
            elif reason == "shutdown" or (reason is None and outcome is not None and outcome.status == PREEMPTED):
                states.requeue(session, job_id=attempt.job_id, attempt=attempt.attempt,
                               reason="worker shutting down" if reason else "the recipe was preempted",
                               max_attempts=self.settings.max_attempts)
            elif reason is None:
                states.fail(session, job_id=attempt.job_id, attempt=attempt.attempt, error=self._error(attempt, outcome))
            elif reason == "budget":
                states.fail(session, job_id=attempt.job_id, attempt=attempt.attempt, error={
                    "code": "budget_exceeded", "param": None,
                    "message": f"stopped at a checkpoint: {attempt.budget_problem}"})
            elif reason == PAUSED and outcome is not None and outcome.status not in (SUCCEEDED, PREEMPTED):
                add_event(session, job_id=attempt.job_id, level="warn", data={"kind": "pause", "exit_code": code},
                          message=f"the recipe exited with code {code} while pausing; resume continues from the last checkpoint")
            cost.finalize_if_finished(session, job_id=attempt.job_id)
        if attempt.run is not None:
            attempt.run.close()
        if self.settings.encrypt_at_rest:  # nor a tokenized one (docs/storage.md, "No plaintext left behind")
            job_storage.remove_job_tokenized(self.db, job_id=attempt.job_id, home=tuneforge_home())
        if sealing and succeeding:  # what the registry read (adapter, model, export, evaluation): it never runs again
            # (only a succeeded job: a re-queued one may already be running again here, on its unsealed files)
            self._seal_outputs(attempt)
        self.attempts.pop(attempt.job_id, None)
        log.info("job %s attempt %d finished: exit %s, %s", attempt.job_id, attempt.attempt, code, attempt.stop_reason or "done")

    def _seal_outputs(self, attempt: Attempt, parts: tuple[str, ...] = job_files.SEALED_PARTS) -> None:
        """Checkpoints, the adapter or model, the evaluation report, output items and exports sealed at rest
        once no run reads them (skipped when another worker's run may be in the directory: lost, superseded);
        the next run of the job unseals its checkpoints."""
        try:
            report = job_files.seal_job_dir(self.db, self.store.keys, tenant_id=attempt.tenant_id,
                                            job_id=attempt.job_id, job_dir=attempt.job_dir, parts=parts)
        except Exception:  # the job's outcome stands; its files stay plaintext until the next run ends
            log.exception("job %s: its directory could not be sealed at rest", attempt.job_id)
            return
        if report.files:
            log.info("job %s: sealed %d files (%.1f MB) at rest in %.2f s", attempt.job_id, report.files,
                     report.bytes / 1e6, report.seconds)

    def _outcome(self, attempt: Attempt, code: int | None) -> RecipeOutcome | None:
        """What the recipe's run came to (None: it never ran)."""
        if code is None:
            return None
        self._copy_resolved_spec(attempt)
        return interpret(code, attempt.report, summary_written=(attempt.job_dir / SUMMARY_FILE).exists(),
                         stderr_tail=self._run_log(attempt))

    def _restart(self, attempt: Attempt, outcome: RecipeOutcome) -> bool:
        """A crash with restarts left: run the recipe again in this attempt, from its last checkpoint (same
        lease, same devices). Bad input and stop requests are never restarted."""
        if not outcome.restartable(attempt.restarts, attempt.spec.checkpoint.max_restarts):
            return False
        with self.db.session() as session:
            count = states.restart(session, job_id=attempt.job_id, attempt=attempt.attempt,
                                   reason=self._redact(outcome.reason, attempt), step=attempt.report.last_step,
                                   max_restarts=attempt.spec.checkpoint.max_restarts)
        if count is None:
            return False
        log.info("job %s attempt %d: %s; restart %d", attempt.job_id, attempt.attempt, outcome.reason, count)
        with self.db.session() as session:
            self._record_usage(session, attempt, time.time())
        attempt.gpu_seconds += self._run_seconds(attempt)
        if attempt.run is not None:
            attempt.run.close()
        attempt.run, attempt.restarts, attempt.report = None, count, RecipeReport()
        self._launch(attempt)  # or at the next tick, once the crashed run has let go of the directory
        return True

    def _run_seconds(self, attempt: Attempt) -> float:
        return (time.time() - attempt.started) * attempt.gpus if attempt.run is not None else 0.0

    def _publish(self, attempt: Attempt, summary: JobSummary) -> JobSummary | None:
        """The job's outputs, and the checkpoints retention keeps of a training run, into the object store before
        it counts as succeeded; None (the job fails with the reason) when the store refuses them."""
        try:
            job_storage.publish_outputs(self.tenant_store, tenant_id=attempt.tenant_id, job_id=attempt.job_id,
                                        job_dir=attempt.job_dir)
            if summary.eval_run is None and summary.method != "export":  # what registering its output keeps
                job_storage.publish_checkpoints(
                    self.tenant_store, tenant_id=attempt.tenant_id, job_id=attempt.job_id, job_dir=attempt.job_dir,
                    keep_last=attempt.spec.checkpoint.keep_last, keys=self.store.keys,
                    best_step=summary.best_checkpoint.step if summary.best_checkpoint else None)
        except OSError as exc:  # job_storage.StoreUnavailable included
            attempt.report.error = f"the outputs could not be published to the object store: {exc}"
            return None
        return summary

    def _summary(self, attempt: Attempt) -> JobSummary | None:
        try:
            summary = read_summary(attempt.job_dir)
        except ValueError as exc:  # pydantic's ValidationError: the job fails with the reason
            attempt.report.error = f"unreadable summary.json: {exc}"
            return None
        if summary is None:
            attempt.report.error = "the recipe reported success but wrote no summary.json"
        return summary

    def _succeed(self, session, attempt: Attempt, summary: JobSummary) -> None:
        job = job_rows.get_job_any_tenant(session, job_id=attempt.job_id)
        if summary.eval_run is not None:  # an eval run: its results, and no model
            try:
                items = [record.model_dump(mode="json") for record in read_output_items(attempt.job_dir)]
            except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                states.fail(session, job_id=job.id, attempt=attempt.attempt, error={
                    "code": "training_failed", "param": None,
                    "message": self._redact(f"the eval run's output items cannot be read: {exc}", attempt)})
                return
            if states.succeed(session, job_id=job.id, attempt=attempt.attempt, fine_tuned_model=None, trained_tokens=None):
                eval_rows.record_run_result(session, job_id=job.id, result=summary.eval_run.model_dump(mode="json"),
                                            items=items)
            return
        if summary.method == "export":  # an export job: its files and serve.json in DIR/export, no new model
            if states.succeed(session, job_id=job.id, attempt=attempt.attempt, fine_tuned_model=None, trained_tokens=None):
                register_export(session, self.store, job=job, job_dir=attempt.job_dir)  # an artifact, with its lineage
            return
        model_id = fine_tuned_model_id(job)
        if states.succeed(session, job_id=job.id, attempt=attempt.attempt, fine_tuned_model=model_id,
                          trained_tokens=summary.trained_tokens):
            register_job_output(session, job=job, job_dir=attempt.job_dir, home=tuneforge_home(), output=summary.output,
                                store=self.store)

    def _error(self, attempt: Attempt, outcome: RecipeOutcome | None) -> dict[str, Any]:
        if outcome is None or outcome.status == SUCCEEDED:  # never started, or its summary could not be read
            message = f"training failed: {attempt.report.error or 'the recipe did not run'}"
        elif outcome.reported:
            message = f"training failed: {outcome.reason}"
        elif outcome.failed_rank is None and outcome.exit_code != 0:
            message = (f"the training process {describe_exit(outcome.exit_code)} without reporting an error"
                       f"{self._log_tail(attempt)}")
        else:
            message = f"training failed: {outcome.reason}"
        if attempt.restarts and outcome is not None and outcome.status != BAD_INPUT:
            message += f" (after {attempt.restarts} restarts from the last checkpoint)"
        return {"code": "training_failed", "param": None, "message": self._redact(message, attempt)}

    def _run_log(self, attempt: Attempt, limit: int = 65536) -> str:
        """The last `limit` bytes this run wrote to recipe.log (torchrun's failure report is there)."""
        try:
            with open(attempt.job_dir / RECIPE_LOG, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(attempt.log_offset, size - limit))
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _log_tail(self, attempt: Attempt, lines: int = 5) -> str:
        text = self._run_log(attempt).strip().splitlines()
        return (": " + " | ".join(text[-lines:])) if text else ""

    def _redact(self, message: str, attempt: Attempt) -> str:
        """Users see their job's error; they must not see this server's paths."""
        for path, name in ((attempt.job_dir, "<job dir>"), (self.settings.artifacts_dir, "<artifact store>"),
                           (tuneforge_home(), "$TUNEFORGE_HOME")):
            message = message.replace(str(path), name)
        return message
