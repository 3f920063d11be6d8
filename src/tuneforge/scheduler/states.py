"""The job state machine: the only module that writes a job's status, attempt, lease or restart count.

    validating_files -> queued -> running -> succeeded | failed
                                    |  ^   \_/ crash restart: same attempt, restarts + 1
                        (lost, preempted: attempt + 1)
    queued | running -> paused -> queued (resume: attempt + 1)
    any unfinished status -> cancelled

Every write is one guarded UPDATE (status, and the attempt number where a worker acts), so a stale
worker -- one whose job was re-queued and claimed again -- changes nothing; functions return whether
the transition happened. Each transition also records a status event in the same transaction.
The lease says which worker may still run something in the job's directory: a job is claimable only
when its lease is released or expired, so a resumed job never runs beside its previous attempt.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.job_events import add_event
from tuneforge.db.tables import Job
from tuneforge.spec.api import (
    ACTIVE_STATUSES,
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    VALIDATING_FILES,
)


def _update(session: Session, *conditions, **values) -> bool:
    statement = update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False)
    return session.execute(statement).rowcount == 1


def _status_event(session: Session, job_id: str, status: str, message: str, *, level: str = "info", **data: Any) -> None:
    add_event(session, job_id=job_id, message=message, level=level, data={"kind": "status", "status": status, **data})


def admit(session: Session, *, job_id: str, error: dict[str, Any] | None = None) -> bool:
    """validating_files -> queued, or -> failed with the validation report as the error."""
    if error is not None:
        done = _update(session, Job.id == job_id, Job.status == VALIDATING_FILES, status=FAILED, error=error, finished_at=now())
        if done:
            _status_event(session, job_id, FAILED, f"Job failed: {error['message']}", level="error", error=error)
        return done
    done = _update(session, Job.id == job_id, Job.status == VALIDATING_FILES, status=QUEUED)
    if done:
        _status_event(session, job_id, QUEUED, "Files validated, moving job to queued state")
    return done


def claim(
    session: Session, *, job_id: str, attempt: int, worker_id: str, lease_until: float, placement: dict[str, Any], now_s: float
) -> bool:
    """queued -> running on this worker, holding the lease until lease_until."""
    done = _update(
        session, Job.id == job_id, Job.attempt == attempt, Job.status == QUEUED,
        status=RUNNING, lease_owner=worker_id, lease_expires_at=lease_until, attempt_started_at=now_s,
        placement=placement, started_at=func.coalesce(Job.started_at, int(now_s)),
    )
    if done:
        _status_event(session, job_id, RUNNING, f"Fine-tuning job started (attempt {attempt})", attempt=attempt, worker=worker_id)
    return done


def renew_lease(session: Session, *, job_id: str, worker_id: str, lease_until: float) -> bool:
    """Extend this worker's lease; False when the lease is no longer this worker's."""
    return _update(session, Job.id == job_id, Job.lease_owner == worker_id, lease_expires_at=lease_until)


def succeed(
    session: Session, *, job_id: str, attempt: int, fine_tuned_model: str | None, trained_tokens: int | None
) -> bool:
    """running (or paused while it was finishing) -> succeeded."""
    done = _update(
        session, Job.id == job_id, Job.attempt == attempt, Job.status.in_((RUNNING, PAUSED)),
        status=SUCCEEDED, fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, finished_at=now(), error=None,
    )
    if done:
        if fine_tuned_model:
            add_event(session, job_id=job_id, message=f"New fine-tuned model created: {fine_tuned_model}",
                      data={"kind": "model", "model": fine_tuned_model})
        _status_event(session, job_id, SUCCEEDED, "The job has successfully completed")
    return done


def fail(session: Session, *, job_id: str, attempt: int, error: dict[str, Any]) -> bool:
    """running -> failed; error is {code, message, param}."""
    done = _update(
        session, Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING,
        status=FAILED, error=error, finished_at=now(),
    )
    if done:
        _status_event(session, job_id, FAILED, f"Job failed: {error['message']}", level="error", error=error)
    return done


def restart(session: Session, *, job_id: str, attempt: int, reason: str, step: int, max_restarts: int) -> int | None:
    """A crashed recipe runs again in the same attempt, resuming from its last checkpoint: count it.

    Guarded by the attempt, the running status and the job's checkpoint.max_restarts (the count is the
    job's, across attempts). Returns the restarts so far, or None when none is left (or the job moved on).
    """
    done = _update(session, Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING, Job.restarts < max_restarts,
                   restarts=Job.restarts + 1)
    if not done:
        return None
    count = session.scalar(select(Job.restarts).where(Job.id == job_id))
    add_event(session, job_id=job_id, level="warn",
              message=f"The training process failed ({reason}); restarting it from the last checkpoint "
                      f"(restart {count} of {max_restarts})",
              data={"kind": "restart", "restart": count, "max_restarts": max_restarts, "reason": reason, "step": step,
                    "attempt": attempt})
    return count


def requeue(
    session: Session, *, job_id: str, attempt: int, reason: str, max_attempts: int, lease_expired_before: float | None = None
) -> str | None:
    """running -> queued as attempt + 1 (it resumes from its last checkpoint), or -> failed after max_attempts.

    With lease_expired_before, only if the lease ran out before that time (the reaper's case).
    Returns the new status, or None when the job had moved on.
    """
    guard = [Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING]
    if lease_expired_before is not None:
        guard.append(Job.lease_expires_at < lease_expired_before)
    if attempt >= max_attempts:
        error = {"code": "too_many_attempts", "param": None,
                 "message": f"the job was interrupted {attempt} times ({reason}); giving up"}
        done = _update(session, *guard, status=FAILED, error=error, finished_at=now(), lease_owner=None, lease_expires_at=None)
        if done:
            _status_event(session, job_id, FAILED, f"Job failed: {error['message']}", level="error", error=error)
        return FAILED if done else None
    done = _update(session, *guard, status=QUEUED, attempt=attempt + 1, lease_owner=None, lease_expires_at=None, placement=None)
    if done:
        _status_event(session, job_id, QUEUED, f"Job re-queued ({reason}); attempt {attempt + 1} resumes from the last checkpoint",
                      level="warn", attempt=attempt + 1, reason=reason)
    return QUEUED if done else None


def cancel(session: Session, *, job_id: str) -> bool:
    """Any unfinished status -> cancelled. A worker running it sees the change at its next heartbeat and stops it."""
    done = _update(session, Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), status=CANCELLED, finished_at=now())
    if done:
        _status_event(session, job_id, CANCELLED, "Job cancelled")
    return done


def pause(session: Session, *, job_id: str) -> bool:
    """queued | running -> paused. A running job's worker stops the recipe, which writes a checkpoint first."""
    done = _update(session, Job.id == job_id, Job.status.in_((QUEUED, RUNNING)), status=PAUSED)
    if done:
        _status_event(session, job_id, PAUSED, "Job paused; it keeps its checkpoints and resumes from the last one")
    return done


def resume(session: Session, *, job_id: str) -> bool:
    """paused -> queued as a new attempt (the claim waits until the previous attempt has let go of the lease)."""
    done = _update(
        session, Job.id == job_id, Job.status == PAUSED,
        status=QUEUED, attempt=Job.attempt + 1, placement=None,
    )
    if done:
        _status_event(session, job_id, QUEUED, "Job resumed and queued")
    return done


def release_lease(session: Session, *, job_id: str, worker_id: str, gpu_seconds: float = 0.0) -> bool:
    """The worker's process for this job has exited: record the GPU time it used and let go of the lease. The
    time counts even when the lease is no longer this worker's (a cancelled job whose lease ran out while it
    stopped, and the reaper dropped it): the devices were busy all the same, and the usage records (the
    bill) already count it."""
    if gpu_seconds:
        _update(session, Job.id == job_id, gpu_seconds=Job.gpu_seconds + gpu_seconds)
    return _update(session, Job.id == job_id, Job.lease_owner == worker_id, lease_owner=None, lease_expires_at=None)


def drop_expired_lease(session: Session, *, job_id: str, now_s: float) -> bool:
    """A lease that ran out on a job that is not running (paused, cancelled, queued again): nobody holds it now."""
    return _update(
        session, Job.id == job_id, Job.status != RUNNING, Job.lease_expires_at < now_s,
        lease_owner=None, lease_expires_at=None,
    )


__all__ = [
    "admit", "cancel", "claim", "drop_expired_lease", "fail", "pause", "release_lease", "renew_lease", "requeue",
    "restart", "resume", "succeed",
]
