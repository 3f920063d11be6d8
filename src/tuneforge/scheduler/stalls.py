"""The no-progress alert (`monitoring.alerts.no_progress`), checked by the worker that tends the job: a hung
recipe (a deadlocked collective, a stuck data loader, a GPU that stopped answering) cannot report itself.

The clock starts when the recipe is launched and restarts at every metrics event with a step. An alert
event when it fires, another when steps resume; with stop_job the job fails with the alert as its error,
and the worker's next check stops the recipe the agreed way (SIGTERM: a checkpoint if it still can).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from tuneforge.db.job_events import add_event
from tuneforge.scheduler import states
from tuneforge.spec.job import JobSpec
from tuneforge.spec.monitoring import NoProgressAlert, alert_event


def no_progress_rule(spec: JobSpec) -> NoProgressAlert | None:
    """The job's no-progress alert; None when off, and for eval runs and exports (no optimizer steps to report)."""
    rule = spec.monitoring.alerts.no_progress
    return None if spec.method in ("eval", "export") or not rule.enabled else rule


def is_stalled(rule: NoProgressAlert, *, last_progress: float, now_s: float) -> bool:
    return now_s - last_progress > rule.minutes * 60


def record_stall(session: Session, *, job_id: str, attempt: int, rule: NoProgressAlert, step: int) -> None:
    """The firing event, and with stop_job the job's failure (guarded by the attempt, like every status change)."""
    message = f"no optimizer step reported for {rule.minutes:g} minutes (last step {step})"
    stops = " (monitoring.alerts stop_job: the job is stopped)" if rule.stop_job else ""
    add_event(session, job_id=job_id, level="warn", message=f"alert no_progress: {message}{stops}",
              data=alert_event("no_progress", stop_job=rule.stop_job, step=step, state="firing", minutes=rule.minutes))
    if rule.stop_job:
        states.fail(session, job_id=job_id, attempt=attempt, error={
            "code": "no_progress", "param": "monitoring.alerts.no_progress", "message": f"stopped by an alert: {message}"})


def record_progress_resumed(session: Session, *, job_id: str, step: int) -> None:
    add_event(session, job_id=job_id, message=f"alert no_progress cleared at step {step}",
              data=alert_event("no_progress", stop_job=False, step=step, state="resolved"))
