"""Sweeps and their trials: rows of the sweeps and sweep_trials tables (Optuna's own tables are Optuna's to write)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import Job, JobEvent, Sweep, SweepTrial, UsageRecord

SWEEP = "sweep_"
RUNNING, SUCCEEDED, CANCELLED, FAILED = "running", "succeeded", "cancelled", "failed"
PRUNED = "pruned"  # a trial's status only
TRIAL_DONE = (SUCCEEDED, PRUNED, FAILED, CANCELLED)


def create_sweep(session: Session, *, tenant_id: str, name: str | None, spec: dict[str, Any]) -> Sweep:
    sweep_id = new_id(SWEEP)
    sweep = Sweep(id=sweep_id, tenant_id=tenant_id, name=name, status=RUNNING, spec=spec, study_name=sweep_id,
                  created_at=now())
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, *, tenant_id: str, sweep_id: str) -> Sweep | None:
    return session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id))


def list_sweeps(session: Session, *, tenant_id: str, limit: int, after: str | None = None) -> tuple[list[Sweep], bool]:
    mine = Sweep.tenant_id == tenant_id
    return keyset_page(session, select(Sweep).where(mine), key=Sweep.seq, id_column=Sweep.id, after=after, limit=limit,
                       scope=mine)


def running_sweeps(session: Session, *, tenant_id: str | None = None) -> list[Sweep]:
    """The running sweeps, of one tenant or (None) of every tenant."""
    query = select(Sweep).where(Sweep.status == RUNNING)
    if tenant_id is not None:
        query = query.where(Sweep.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(Sweep.seq)))


def finish_sweep(session: Session, *, sweep_id: str, status: str, reason: str, best_job_id: str | None = None,
                 best_model: str | None = None) -> bool:
    """running -> succeeded | cancelled | failed, once."""
    return session.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.status == RUNNING).values(
        status=status, stop_reason=reason[:255], finished_at=now(), best_job_id=best_job_id, best_model=best_model,
    ).execution_options(synchronize_session=False)).rowcount == 1


def add_trial(session: Session, *, sweep_id: str, number: int, job_id: str | None, params: dict[str, Any],
              status: str = RUNNING, error: str | None = None) -> SweepTrial:
    trial = SweepTrial(sweep_id=sweep_id, number=number, job_id=job_id, status=status, params=params, reported_step=0,
                       error=error, created_at=now(), finished_at=None if status == RUNNING else now())
    session.add(trial)
    session.flush()
    return trial


def trials_of(session: Session, *, sweep_id: str) -> list[SweepTrial]:
    return list(session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)))


def trials_with_jobs(session: Session, *, sweep_id: str) -> list[tuple[SweepTrial, Job | None]]:
    rows = session.execute(select(SweepTrial, Job).outerjoin(Job, Job.id == SweepTrial.job_id)
                           .where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number))
    return [(trial, job) for trial, job in rows]


def record_report(session: Session, *, trial_seq: int, step: int) -> None:
    session.execute(update(SweepTrial).where(SweepTrial.seq == trial_seq).values(reported_step=step)
                    .execution_options(synchronize_session=False))


def finish_trial(session: Session, *, trial_seq: int, status: str, values: list[float] | None = None,
                 error: str | None = None) -> bool:
    """running -> a final status, once (a driver that restarts mid-tick never finishes a trial twice)."""
    return session.execute(update(SweepTrial).where(SweepTrial.seq == trial_seq, SweepTrial.status == RUNNING).values(
        status=status, values=values, error=error, finished_at=now(),
    ).execution_options(synchronize_session=False)).rowcount == 1


def sweep_gpu_seconds(session: Session, *, sweep_id: str) -> float:
    """GPU-seconds of the sweep's trial jobs (each job's own accounting, kept by its workers)."""
    total = session.scalar(select(func.sum(Job.gpu_seconds)).join(SweepTrial, SweepTrial.job_id == Job.id)
                           .where(SweepTrial.sweep_id == sweep_id))
    return float(total or 0.0)


def sweep_cost_usd(session: Session, *, sweep_id: str) -> float:
    """US dollars of the sweep's trial jobs, as the workers priced their device time (usage_records)."""
    total = session.scalar(select(func.sum(UsageRecord.cost_usd)).join(SweepTrial, SweepTrial.job_id == UsageRecord.job_id)
                           .where(SweepTrial.sweep_id == sweep_id))
    return float(total or 0.0)


def latest_events(session: Session, *, job_id: str, limit: int = 200) -> list[JobEvent]:
    """A job's newest events, newest first (its final evaluation is among the last few)."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
                                .limit(limit)))
