"""The sweep driver: asks Optuna for trials, runs each as an ordinary job, prunes, tells Optuna the results.

Each tick, for every running sweep: finish the trials whose jobs ended (the objective from the job's final
evaluation event), feed the validation metrics of running trials to the pruner as intermediate values and
cancel the jobs it prunes (the worker stops the recipe at its next step boundary, which frees the slot),
check the budget, then ask for new trials up to the parallelism and submit them through
scheduler/submission. The study lives in Optuna's RDB storage in the control plane's own database, so a
restarted driver carries on where the last one stopped; every step is idempotent against a crash between
the two databases' commits (Optuna's state is checked before anything is told twice).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any

from pydantic import ValidationError
from sqlalchemy import text

from tuneforge.db import job_events as event_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import quotas
from tuneforge.db import sweeps as sweep_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.session import Database, is_sqlite
from tuneforge.db.tables import Job, Sweep, SweepTrial
from tuneforge.registry.models import RegistryError, resolve_base_reference
from tuneforge.registry.named_models import NamedModelError, check_named_models
from tuneforge.scheduler import states
from tuneforge.scheduler.admission import live_inventories
from tuneforge.scheduler.loop import run_until_stopped, stop_on_signals
from tuneforge.scheduler import cost
from tuneforge.scheduler.submission import QuotaExceeded, budget_problem, check_submission, submit_job
from tuneforge.settings import Settings
from tuneforge.spec.api import CANCELLED, FAILED, SUCCEEDED, TERMINAL_STATUSES
from tuneforge.spec.openai_jobs import REGISTERED_MODEL
from tuneforge.spec.sweep import SweepSpec

log = logging.getLogger("tuneforge.sweeps")
BEST_ALIAS = "best"  # the registry alias of the sweep's best trial, on the sweep's model name
_storages: dict[str, Any] = {}
_storage_lock = threading.Lock()


def optuna_storage(url: str):
    """Optuna's RDB storage on the control plane's database (one per process and URL). Its tables come from
    migration 0010, so Optuna creates nothing and runs no Alembic of its own; the schema version is ours to check."""
    import optuna
    from optuna.storages._rdb import models

    with _storage_lock:
        if url in _storages:
            return _storages[url]
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if is_sqlite(url) else {"pool_pre_ping": True}
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True,
                                             skip_table_creation=True)
        with storage.engine.connect() as connection:
            found = connection.execute(text("SELECT schema_version FROM version_info")).scalar()
        if found != models.SCHEMA_VERSION:
            raise RuntimeError(f"Optuna {optuna.__version__} expects its schema version {models.SCHEMA_VERSION}, the "
                               f"database has {found}: a tuneforge migration must move Optuna's tables first")
        _storages[url] = storage
        return storage


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "tpe":
        # Optuna's TPE samples its first 10 trials at random: under a smaller trial budget a "tpe" sweep would
        # be a random one (bench/sweep.py's 6 trials were). A third of the budget, at least 2, explores.
        budget = spec.budget.max_trials
        startup = 10 if budget is None else min(10, max(2, budget // 3))
        # multivariate: one joint density over the parameters instead of one per parameter, so that TPE can follow
        # a ridge such as LoRA's (the update scales with lr x alpha / rank: a lower rank wants a lower rate);
        # group: needed for that under conditional parameters (each set that appears together gets its own);
        # constant liar: trials running at once are counted as bad results, so parallel asks spread out.
        with warnings.catch_warnings():  # the three options are marked experimental in Optuna 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup, multivariate=True,
                                              group=spec.conditional(), constant_liar=spec.parallelism > 1)
    # grid: every point is enqueued when the study is created (with its conditions applied, which Optuna's
    # GridSampler cannot do); the random sampler is never asked for an enqueued point.
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _pruner(spec: SweepSpec):
    import optuna

    first = spec.warmup_steps()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_warmup_trials, n_warmup_steps=first)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=spec.base.training.max_steps or "auto")
    return optuna.pruners.NopPruner()


def _last_step(job: Job, step: int) -> bool:
    """Whether a validation is the trial's last: its job is about to end with the objective measured, which
    a prune would throw away after paying for it (a successive-halving rung can fall on max_steps)."""
    max_steps = ((job.spec or {}).get("training") or {}).get("max_steps")
    return isinstance(max_steps, int) and step >= max_steps


def open_study(storage, sweep: Sweep, spec: SweepSpec):
    """The sweep's study: created (with the grid enqueued) the first time, loaded after."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=sweep.study_name, sampler=_sampler(spec),
                                pruner=_pruner(spec), directions=spec.directions(), load_if_exists=True)
    if spec.sampler == "grid" and not study.user_attrs.get("grid_enqueued"):
        for point in spec.grid_points():
            study.enqueue_trial(spec.optuna_params(point), skip_if_exists=True)
        study.set_user_attr("grid_enqueued", True)
    return study


def objective_values(spec: SweepSpec, scores: dict[str, Any]) -> list[float] | None:
    """The objectives from a job's final scores (metrics and graders by name); None when one is missing."""
    values = []
    for objective in spec.objectives:
        value = scores.get(objective.metric)
        if value is None:
            value = (scores.get("graders") or {}).get(objective.metric)
        if not isinstance(value, (int, float)):
            return None
        values.append(float(value))
    return values


class SweepDriver:
    def __init__(self, db: Database, settings: Settings):
        self.db, self.settings = db, settings
        self._studies: dict[str, Any] = {}

    def run_once(self) -> int:
        """One tick over every running sweep; returns how many trials it submitted."""
        with self.db.read_session() as session:
            sweeps = sweep_rows.running_sweeps(session)
        submitted = 0
        for sweep in sweeps:
            try:
                submitted += self._tend(sweep)
            except Exception:  # one broken sweep must not stop the others; the next tick retries it
                log.exception("sweep %s: tick failed", sweep.id)
        return submitted

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        stop_on_signals(stop)
        run_until_stopped(self.run_once, interval=max(self.settings.poll_seconds, 0.5), stop=stop)

    # ---- one sweep ------------------------------------------------------------------------------------

    def _study(self, sweep: Sweep, spec: SweepSpec):
        if sweep.id not in self._studies:
            self._studies[sweep.id] = open_study(optuna_storage(self.db.url), sweep, spec)
        return self._studies[sweep.id]

    def _tend(self, sweep: Sweep) -> int:
        spec = SweepSpec.model_validate(sweep.spec)
        study = self._study(sweep, spec)
        with self.db.read_session() as session:
            trials = sweep_rows.trials_with_jobs(session, sweep_id=sweep.id)
        self._forget_orphans(study, {trial.number for trial, _ in trials})
        for trial, job in trials:
            if trial.status == sweep_rows.RUNNING:
                self._follow(study, spec, trial, job)
        with self.db.read_session() as session:
            trials = sweep_rows.trials_with_jobs(session, sweep_id=sweep.id)
            used_s = sweep_rows.sweep_gpu_seconds(session, sweep_id=sweep.id)
            spent = sweep_rows.sweep_cost_usd(session, sweep_id=sweep.id) if spec.budget.cost_usd else 0.0
        running = [(t, j) for t, j in trials if t.status == sweep_rows.RUNNING]
        over = self._over_budget(sweep, spec, used_s, spent)
        if over:
            for trial, job in running:  # a GPU-hour or wall-time budget is a hard limit: stop what runs
                self._stop_trial(study, trial, job, status=sweep_rows.CANCELLED, note=f"sweep budget reached ({over})")
            self._finish(sweep, spec, study, reason=over)
            return 0
        done = self._exhausted(spec, len(trials))
        if done:
            if not running:
                self._finish(sweep, spec, study, reason=done)
            return 0
        return self._submit(sweep, spec, study, room=min(spec.parallelism - len(running),
                                                           self._limit(spec) - len(trials)))

    def _follow(self, study, spec: SweepSpec, trial: SweepTrial, job: Job | None) -> None:
        """Report a trial's new validation metrics (the pruner compares trials step by step, finished ones
        included); finish it when its job ended, else prune it if the pruner says so."""
        import optuna

        frozen = study._storage.get_trial(self._trial_id(study, trial.number))
        running = frozen.state == optuna.trial.TrialState.RUNNING
        last = self._report(study, spec, trial, job, frozen._trial_id) if running and job is not None else None
        if job is None or job.status in TERMINAL_STATUSES:
            self._conclude(study, spec, trial, job, frozen)
        elif last is not None and not _last_step(job, last[0]) and \
                optuna.trial.Trial(study, frozen._trial_id).should_prune():
            key = f"valid_{spec.objectives[0].metric}"
            self._stop_trial(study, trial, job, status=sweep_rows.PRUNED,
                             note=f"pruned by the sweep at step {last[0]} ({key}={last[1]:.4g})")

    def _report(self, study, spec: SweepSpec, trial: SweepTrial, job: Job, trial_id: int) -> tuple[int, float] | None:
        """Tell Optuna the validation values measured since the last report; returns the newest (step, value)."""
        import optuna

        if spec.pruner == "none":
            return None
        key = f"valid_{spec.objectives[0].metric}"
        with self.db.read_session() as session:
            points = [(m.step, float(m.values[key])) for m in event_rows.list_metrics(
                session, job_id=job.id, after_step=trial.reported_step) if isinstance(m.values.get(key), (int, float))]
        if not points:
            return None
        live = optuna.trial.Trial(study, trial_id)
        for step, value in points:
            live.report(value, step)
        with self.db.session() as session:
            sweep_rows.record_report(session, trial_seq=trial.seq, step=points[-1][0])
        return points[-1]

    def _conclude(self, study, spec: SweepSpec, trial: SweepTrial, job: Job | None, frozen) -> None:
        import optuna

        values, error, status = None, None, sweep_rows.FAILED
        if job is not None and job.status == SUCCEEDED:
            with self.db.read_session() as session:
                values = objective_values(spec, self._final_scores(session, job.id))
            status = sweep_rows.SUCCEEDED if values is not None else sweep_rows.FAILED
            error = None if values is not None else "the job did not report the objective in its final evaluation"
        elif job is not None and job.status == CANCELLED:
            status, error = sweep_rows.CANCELLED, "the trial's job was cancelled"
        elif job is not None and job.status == FAILED:
            error = (job.error or {}).get("message") or "the trial's job failed"
        if frozen.state == optuna.trial.TrialState.RUNNING:
            if values is not None:
                study.tell(trial.number, values)
            else:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        with self.db.session() as session:
            sweep_rows.finish_trial(session, trial_seq=trial.seq, status=status, values=values, error=error)

    def _stop_trial(self, study, trial: SweepTrial, job: Job | None, *, status: str, note: str) -> None:
        """Cancel the trial's job (its worker stops the recipe at the next step boundary and frees the slot)."""
        import optuna

        if job is not None:
            with self.db.session() as session:
                if states.cancel(session, job_id=job.id):
                    event_rows.add_event(session, job_id=job.id, message=note, level="warn",
                                         data={"kind": "sweep", "status": status, "sweep_trial": trial.number})
        frozen = study._storage.get_trial(self._trial_id(study, trial.number))
        if frozen.state == optuna.trial.TrialState.RUNNING:
            state = optuna.trial.TrialState.PRUNED if status == sweep_rows.PRUNED else optuna.trial.TrialState.FAIL
            study.tell(trial.number, state=state)
        with self.db.session() as session:
            sweep_rows.finish_trial(session, trial_seq=trial.seq, status=status, error=note)

    @staticmethod
    def _final_scores(session, job_id: str) -> dict[str, Any]:
        for event in sweep_rows.latest_events(session, job_id=job_id):
            data = event.data or {}
            if data.get("kind") == "eval" and data.get("model") == "fine-tuned":
                return data.get("metrics") or {}
        return {}

    @staticmethod
    def _trial_id(study, number: int) -> int:
        return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)

    def _forget_orphans(self, study, numbers: set[int]) -> None:
        """A trial Optuna handed out whose job was never recorded (the driver stopped in between): failed."""
        import optuna

        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen.number not in numbers:
                study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)

    # ---- budget ---------------------------------------------------------------------------------------

    @staticmethod
    def _limit(spec: SweepSpec) -> int:
        limits = [spec.budget.max_trials] if spec.budget.max_trials else []
        if spec.sampler == "grid":
            limits.append(len(spec.grid_points()))
        return min(limits) if limits else 10**9

    def _exhausted(self, spec: SweepSpec, asked: int) -> str | None:
        if asked < self._limit(spec):
            return None
        if spec.sampler == "grid" and asked >= len(spec.grid_points()):
            return f"the grid is done ({asked} trials)"
        return f"budget.max_trials reached ({asked} trials)"

    @staticmethod
    def _over_budget(sweep: Sweep, spec: SweepSpec, used_s: float, spent_usd: float) -> str | None:
        budget = spec.budget
        if budget.gpu_hours is not None and used_s / 3600 >= budget.gpu_hours:
            return f"budget.gpu_hours reached ({used_s / 3600:.3g} of {budget.gpu_hours:g})"
        if budget.cost_usd is not None and spent_usd >= budget.cost_usd:
            return f"budget.cost_usd reached ({spent_usd:.4g} of {budget.cost_usd:g} USD)"
        hours = (time.time() - sweep.created_at) / 3600
        if budget.wall_hours is not None and hours >= budget.wall_hours:
            return f"budget.wall_hours reached ({hours:.3g} of {budget.wall_hours:g})"
        return None

    # ---- new trials -----------------------------------------------------------------------------------

    def _submit(self, sweep: Sweep, spec: SweepSpec, study, *, room: int) -> int:
        import optuna

        submitted = 0
        for _ in range(max(0, room)):
            with self.db.read_session() as session:
                tenant = tenant_rows.get_tenant(session, tenant_id=sweep.tenant_id)
                if tenant is not None and tenant.max_active_jobs is not None and \
                        quotas.active_jobs(session, tenant_id=sweep.tenant_id) >= tenant.max_active_jobs:
                    return submitted  # the quota frees up as trials finish: ask again next tick
                inventories = live_inventories(session)
            trial = study.ask()
            chosen = spec.suggest(trial)
            name = sweep.name or sweep.id.removeprefix(sweep_rows.SWEEP)[:12]
            try:
                job_spec = spec.trial_spec(chosen, name=name)
            except ValidationError as exc:  # a combination the job spec refuses (each value alone is valid)
                self._record_failed(study, sweep, trial.number, chosen, f"the job spec refuses this combination: {exc}")
                continue
            with self.db.read_session() as session:  # priced like an API job: the budgets count its estimate
                estimate = cost.estimate_job(session, tenant_id=sweep.tenant_id, spec=job_spec, inventories=inventories)
            problem = check_submission(job_spec, inventories).problem or budget_problem(job_spec, estimate)
            refused = problem.message if problem is not None else self._unavailable_model(sweep, job_spec)
            if refused is not None:
                self._record_failed(study, sweep, trial.number, chosen, refused)
                continue
            try:
                with self.db.session() as session:
                    job = submit_job(session, tenant_id=sweep.tenant_id, spec=job_spec, model=job_spec.model.base_model,
                                     training_file=job_spec.dataset.path, validation_file=job_spec.dataset.validation_path,
                                     suffix=name, metadata={"sweep": sweep.id, "sweep_trial": str(trial.number)},
                                     idempotency_key=f"{sweep.id}:{trial.number}", request_hash=None,
                                     estimate=estimate)
                    sweep_rows.add_trial(session, sweep_id=sweep.id, number=trial.number, job_id=job.id, params=chosen)
            except QuotaExceeded:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                if spec.sampler == "grid":  # the point goes back in the queue
                    study.enqueue_trial(spec.optuna_params(chosen))
                return submitted
            log.info("sweep %s: trial %d is job %s (%s)", sweep.id, trial.number, job.id, chosen)
            submitted += 1
        return submitted

    def _unavailable_model(self, sweep: Sweep, job_spec) -> str | None:
        """Why a trial's models are not the tenant's now (a checkpoint the retention policy pruned, a model deleted
        since the sweep was created), resolved as a job request's are at submission; None when they all are. A
        local sweep's base may be a directory (the CLI's own door): only registered (ft:) ones are looked up."""
        with self.db.read_session() as session:
            try:
                if REGISTERED_MODEL.match(job_spec.model.base_model):
                    resolve_base_reference(session, tenant_id=sweep.tenant_id, ref=job_spec.model.base_model)
                check_named_models(session, tenant_id=sweep.tenant_id, spec=job_spec)
            except NamedModelError as exc:
                return exc.message
            except RegistryError as exc:
                return f"model.base_model: {exc.message}"
        return None

    def _record_failed(self, study, sweep: Sweep, number: int, chosen: dict[str, Any], error: str) -> None:
        import optuna

        study.tell(number, state=optuna.trial.TrialState.FAIL)
        with self.db.session() as session:
            sweep_rows.add_trial(session, sweep_id=sweep.id, number=number, job_id=None, params=chosen,
                                 status=sweep_rows.FAILED, error=error[:2000])

    # ---- the end --------------------------------------------------------------------------------------

    def _finish(self, sweep: Sweep, spec: SweepSpec, study, *, reason: str) -> None:
        """Close the sweep: the best trial (the first of the Pareto front for several objectives) becomes the
        `best` alias of the sweep's model name in the registry."""
        self._studies.pop(sweep.id, None)
        best_job = best_model = None
        with self.db.session() as session:
            rows = sweep_rows.trials_with_jobs(session, sweep_id=sweep.id)
            front = pareto_front(spec, [trial for trial, _ in rows])
            job = next((job for trial, job in rows if front and trial.number == front[0].number), None)
            if job is not None:
                best_job, best_model = job.id, job.fine_tuned_model
            status = sweep_rows.SUCCEEDED if best_job else sweep_rows.FAILED
            if not sweep_rows.finish_sweep(session, sweep_id=sweep.id, status=status,
                                           reason=reason if best_job else f"{reason}; no trial succeeded",
                                           best_job_id=best_job, best_model=best_model):
                return  # cancelled meanwhile
            version = version_rows.version_of_model(session, tenant_id=sweep.tenant_id,
                                                    model_id=best_model) if best_model else None
            if version is not None:
                version_rows.set_alias(session, version=version, alias=BEST_ALIAS)
                version_rows.set_tag(session, version_id=version.id, key="sweep", value=sweep.id)
            log.info("sweep %s %s: %s; best job %s", sweep.id, status, reason, best_job)


def cancel_sweep(db: Database, sweep: Sweep) -> bool:
    """Cancel a running sweep, the jobs of its running trials, and their Optuna trials."""
    import optuna

    with db.session() as session:
        if not sweep_rows.finish_sweep(session, sweep_id=sweep.id, status=sweep_rows.CANCELLED, reason="cancelled"):
            return False
        for trial, job in sweep_rows.trials_with_jobs(session, sweep_id=sweep.id):
            if trial.status == sweep_rows.RUNNING and job is not None and states.cancel(session, job_id=job.id):
                event_rows.add_event(session, job_id=job.id, message="cancelled with its sweep", level="warn",
                                     data={"kind": "sweep", "status": "cancelled", "sweep_trial": trial.number})
            if trial.status == sweep_rows.RUNNING:
                sweep_rows.finish_trial(session, trial_seq=trial.seq, status=sweep_rows.CANCELLED,
                                        error="the sweep was cancelled")
    try:
        study = optuna.load_study(study_name=sweep.study_name, storage=optuna_storage(db.url))
    except KeyError:  # the driver had not created the study yet
        return True
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
    return True


# ---- what the API and `tuneforge sweep show` see ------------------------------------------------------


def pareto_front(spec: SweepSpec, trials: list[SweepTrial]) -> list[SweepTrial]:
    """The succeeded trials no other succeeded trial beats on every objective, best first by the first one."""
    signs = [1 if d == "minimize" else -1 for d in spec.directions()]
    done = [t for t in trials if t.status == sweep_rows.SUCCEEDED and t.values]
    keyed = [(t, [s * v for s, v in zip(signs, t.values)]) for t in done]

    def beaten(mine: list[float]) -> bool:
        return any(all(o <= m for o, m in zip(other, mine)) and other != mine for _, other in keyed)

    return [t for t, mine in sorted(keyed, key=lambda pair: pair[1][0]) if not beaten(mine)]


def importance(db: Database, sweep: Sweep, spec: SweepSpec) -> dict[str, float] | None:
    """Each parameter's importance for the first objective (PED-ANOVA: numpy only, where fANOVA needs
    scikit-learn), or None before two trials completed or when Optuna cannot tell."""
    import optuna

    try:
        study = optuna.load_study(study_name=sweep.study_name, storage=optuna_storage(db.url))
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 2:
            return None
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            target=(lambda t: t.values[0]) if len(spec.objectives) > 1 else None)
    except (KeyError, ValueError, RuntimeError, ZeroDivisionError):
        return None
    return {name: round(float(value), 4) for name, value in values.items()}


def sweep_object(db: Database, sweep: Sweep, *, with_importance: bool):
    from tuneforge.spec.sweep import SweepBest, SweepObject

    spec = SweepSpec.model_validate(sweep.spec)
    with db.read_session() as session:
        rows = sweep_rows.trials_with_jobs(session, sweep_id=sweep.id)
        used_s = sweep_rows.sweep_gpu_seconds(session, sweep_id=sweep.id)
    trials = [trial for trial, _ in rows]
    jobs = {trial.number: job for trial, job in rows}
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    front = pareto_front(spec, trials)
    best = [SweepBest(number=t.number, job_id=t.job_id, params=t.params, values=t.values,
                      fine_tuned_model=jobs[t.number].fine_tuned_model if jobs.get(t.number) else None)
            for t in (front if len(spec.objectives) > 1 else front[:1])]
    return SweepObject(id=sweep.id, name=sweep.name, status=sweep.status, created_at=sweep.created_at,
                       finished_at=sweep.finished_at, stop_reason=sweep.stop_reason, spec=sweep.spec,
                       trial_counts=counts, gpu_hours=round(used_s / 3600, 6), best=best,
                       importance=importance(db, sweep, spec) if with_importance else None)
