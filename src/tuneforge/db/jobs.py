"""Fine-tuning job rows: creation (with idempotency keys), reads scoped to a tenant, and the queries the
scheduler plans with. Status, attempt, lease and restart columns are written only by scheduler/states.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, func, or_, select, union_all, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import JOB, new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import EvalRun, Job, ModelExport, Tenant
from tuneforge.spec.api import QUEUED, RUNNING, VALIDATING_FILES
from tuneforge.spec.job import JobSpec


def create_job(
    session: Session, *, tenant_id: str, spec: JobSpec, model: str, training_file: str, validation_file: str | None,
    suffix: str | None, metadata: dict[str, str] | None, idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Job:
    """A new job in validating_files; the caller runs admission (scheduler/admission.py) next."""
    resources = spec.resources
    job = Job(
        id=new_id(JOB), tenant_id=tenant_id, status=VALIDATING_FILES, attempt=1, model=model,
        training_file=training_file, validation_file=validation_file, suffix=suffix, metadata_=metadata,
        spec=spec.model_dump(mode="json"), priority=resources.priority, num_gpus=resources.num_gpus,
        num_nodes=resources.num_nodes, gpu_type=resources.gpu_type, created_at=now(), gpu_seconds=0.0,
        idempotency_key=idempotency_key, request_hash=request_hash, events_offset=0,
    )
    session.add(job)
    session.flush()
    return job


def fine_tuning_only():
    """Jobs that are not eval runs or exports: those are scheduled like training but shown only by the Evals
    API and the Exports API. An export job's model is the model it exports, and it has no training file (so it
    stays hidden once its export is deleted); a training job whose deploy: was recorded as an export of the model
    it made (registry/exports.py) is a fine-tuning job still."""
    return (~exists().where(EvalRun.job_id == Job.id) & (Job.training_file != "")
            & ~exists().where(ModelExport.job_id == Job.id, ModelExport.model_id == Job.model))


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job | None:
    """The tenant's fine-tuning job; another tenant's id (or an eval run's job) answers None, exactly like
    a missing one."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id, fine_tuning_only()))


def get_job_any_tenant(session: Session, *, job_id: str) -> Job | None:
    """For the scheduler and workers, which act on behalf of every tenant."""
    return session.scalar(select(Job).where(Job.id == job_id))


def record_resolved_spec(session: Session, *, job_id: str, attempt: int, resolved: dict[str, Any]) -> bool:
    """Copy the recipe's resolved_spec.json (every "auto" filled in) onto the job; only the attempt that
    holds the job may, so a stale worker cannot overwrite a newer attempt's."""
    statement = (update(Job).where(Job.id == job_id, Job.attempt == attempt).values(resolved_spec=resolved)
                 .execution_options(synchronize_session=False))
    return session.execute(statement).rowcount == 1


def find_by_idempotency_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def list_jobs(
    session: Session, *, tenant_id: str, limit: int, after: str | None = None, metadata: dict[str, str] | None = None
) -> tuple[list[Job], bool]:
    """Fine-tuning jobs, newest first; `after` is the last id of the previous page. Returns (page, has_more)."""
    query = select(Job).where(Job.tenant_id == tenant_id, fine_tuning_only())
    if metadata:
        # Metadata filters are rare and the JSON operators differ per database: filter the page in Python,
        # reading ahead in batches until the page is full.
        if after:
            anchor = session.scalar(select(Job.seq).where(Job.id == after, Job.tenant_id == tenant_id))
            query = query.where(Job.seq < anchor) if anchor is not None else query
        return _filter_metadata(session, query, limit, metadata)
    return keyset_page(session, query, key=Job.seq, id_column=Job.id, after=after, limit=limit,
                       scope=Job.tenant_id == tenant_id)


def _filter_metadata(session: Session, query, limit: int, metadata: dict[str, str]) -> tuple[list[Job], bool]:
    matched: list[Job] = []
    last_seq = None
    while True:
        batch_query = query if last_seq is None else query.where(Job.seq < last_seq)
        batch = list(session.scalars(batch_query.order_by(Job.seq.desc()).limit(500)))
        for job in batch:
            if all((job.metadata_ or {}).get(k) == v for k, v in metadata.items()):
                matched.append(job)
                if len(matched) > limit:
                    return matched[:limit], True
        if len(batch) < 500:
            return matched, False
        last_seq = batch[-1].seq


def jobs_in_status(session: Session, *, status: str, created_before: int | None = None, limit: int = 100) -> list[Job]:
    query = select(Job).where(Job.status == status)
    if created_before is not None:
        query = query.where(Job.created_at < created_before)
    return list(session.scalars(query.order_by(Job.seq).limit(limit)))


def claimable(now_s: float):
    """A queued job whose previous lease (if any) is released or expired: nothing runs in its directory."""
    return and_(Job.status == QUEUED, or_(Job.lease_owner.is_(None), Job.lease_expires_at < now_s))


def queued_candidates(session: Session, *, now_s: float, per_tenant: int = 8) -> list[Job]:
    """The first few claimable jobs of every tenant (priority, then age), so no tenant's backlog hides another's.

    One small index range scan per tenant (ix_jobs_queue), joined with UNION ALL: the cost does not grow
    with the length of the queue.
    """
    tenant_ids = list(session.scalars(select(Tenant.id)))
    if not tenant_ids:
        return []
    per = [
        select(Job.seq).where(Job.status == QUEUED, Job.tenant_id == tenant_id, claimable(now_s))
        .order_by(Job.priority.desc(), Job.seq).limit(per_tenant).subquery().select()
        for tenant_id in tenant_ids
    ]
    seqs = union_all(*per).subquery()
    return list(session.scalars(select(Job).where(Job.seq.in_(select(seqs.c.seq))).order_by(Job.seq)))


def lock_claimable(session: Session, *, job_id: str, now_s: float) -> Job | None:
    """Lock one candidate for this transaction; None when another worker holds it or took it already.

    FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite ignores it, and its IMMEDIATE transaction already
    excludes every other writer.
    """
    query = select(Job).where(Job.id == job_id, claimable(now_s)).with_for_update(skip_locked=True)
    return session.scalar(query.execution_options(populate_existing=True))


def running_usage(session: Session, *, tenant_id: str | None = None) -> dict[str, tuple[int, int]]:
    """tenant -> (running jobs, GPUs they hold)."""
    query = select(Job.tenant_id, func.count(), func.coalesce(func.sum(Job.num_gpus * Job.num_nodes), 0)).where(
        Job.status == RUNNING
    )
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return {tenant: (int(count), int(gpus)) for tenant, count, gpus in session.execute(query.group_by(Job.tenant_id))}


def expired_leases(session: Session, *, now_s: float, limit: int = 100) -> list[Job]:
    query = select(Job).where(Job.lease_owner.is_not(None), Job.lease_expires_at < now_s)
    return list(session.scalars(query.order_by(Job.lease_expires_at).limit(limit)))


def usage_by_status(session: Session, *, tenant_id: str) -> dict[str, tuple[int, float]]:
    """status -> (jobs, GPU-seconds used) for one tenant."""
    query = (
        select(Job.status, func.count(), func.coalesce(func.sum(Job.gpu_seconds), 0.0))
        .where(Job.tenant_id == tenant_id)
        .group_by(Job.status)
    )
    return {status: (int(count), float(seconds)) for status, count, seconds in session.execute(query)}
