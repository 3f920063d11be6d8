"""The dataset registry's rows: versions of a tenant's dataset names (each one an uploaded file, whose bytes
stay the file's), their aliases and tags, and the version each job named. Every lookup filters on the tenant
here, so a router cannot forget to."""

from __future__ import annotations

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import DatasetAlias, DatasetTag, DatasetVersion, File, Job, JobDataset

VERSION = "dsv_"


def _live(tenant_id: str):
    return (DatasetVersion.tenant_id == tenant_id, DatasetVersion.deleted_at.is_(None))


def lock_live_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    """The tenant's live file, its row locked until the transaction ends (PostgreSQL; SQLite's writers are
    serialized anyway): a registration and a deletion of the same file cannot both pass their checks."""
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
                          .with_for_update().execution_options(populate_existing=True))


def newest_version(session: Session, *, tenant_id: str, name: str) -> DatasetVersion | None:
    return session.scalar(select(DatasetVersion).where(*_live(tenant_id), DatasetVersion.name == name)
                          .order_by(DatasetVersion.version.desc()).limit(1))


def create_version(session: Session, *, file: File, name: str, source_version_id: str | None) -> DatasetVersion:
    """The next version of name holding file (v1 when the name is new; numbers of deleted versions are not
    reused). Two registrations racing for one number: the unique constraint refuses the second."""
    latest = session.scalar(select(func.max(DatasetVersion.version)).where(
        DatasetVersion.tenant_id == file.tenant_id, DatasetVersion.name == name))
    report = file.report or {}
    row = DatasetVersion(id=new_id(VERSION), tenant_id=file.tenant_id, name=name, version=(latest or 0) + 1,
                         file_id=file.id, filename=file.filename, purpose=file.purpose, sha256=file.sha256,
                         bytes=file.bytes, format=report.get("format"), examples=int(report.get("examples") or 0),
                         source_version_id=source_version_id, created_at=now())
    session.add(row)
    session.flush()
    return row


def list_names(session: Session, *, tenant_id: str, after: str | None, limit: int) -> tuple[list[tuple], bool]:
    """(name, newest version, live versions, created) of the tenant's dataset names in name order, the page
    after the name `after`, and whether there are more."""
    query = (select(DatasetVersion.name, func.max(DatasetVersion.version), func.count(),
                    func.min(DatasetVersion.created_at))
             .where(*_live(tenant_id)).group_by(DatasetVersion.name).order_by(DatasetVersion.name))
    if after:
        query = query.where(DatasetVersion.name > after)
    rows = [tuple(row) for row in session.execute(query.limit(limit + 1))]
    return rows[:limit], len(rows) > limit


def list_versions(session: Session, *, tenant_id: str, name: str, after: str | None = None,
                  limit: int = 10_000) -> tuple[list[DatasetVersion], bool]:
    """The name's live versions, oldest first, the page after the version id `after` (of this name)."""
    scope = (DatasetVersion.tenant_id == tenant_id) & (DatasetVersion.name == name)
    query = select(DatasetVersion).where(*_live(tenant_id), DatasetVersion.name == name)
    return keyset_page(session, query, key=DatasetVersion.seq, id_column=DatasetVersion.id, after=after, limit=limit,
                       scope=scope, descending=False)


def has_versions(session: Session, *, tenant_id: str, name: str) -> bool:
    return session.scalar(select(DatasetVersion.seq).where(*_live(tenant_id), DatasetVersion.name == name)
                          .limit(1)) is not None


def get_version(session: Session, *, tenant_id: str, name: str, version: int) -> DatasetVersion | None:
    return session.scalar(select(DatasetVersion).where(*_live(tenant_id), DatasetVersion.name == name,
                                                       DatasetVersion.version == version))


def version_by_id(session: Session, *, tenant_id: str, version_id: str) -> DatasetVersion | None:
    return session.scalar(select(DatasetVersion).where(*_live(tenant_id), DatasetVersion.id == version_id))


def version_any_state(session: Session, *, tenant_id: str, version_id: str) -> DatasetVersion | None:
    """A version by id, deleted or not (what a lineage or a source_version names)."""
    return session.scalar(select(DatasetVersion).where(DatasetVersion.tenant_id == tenant_id,
                                                       DatasetVersion.id == version_id))


def live_versions_of_file(session: Session, *, tenant_id: str, file_id: str) -> list[DatasetVersion]:
    return list(session.scalars(select(DatasetVersion).where(*_live(tenant_id), DatasetVersion.file_id == file_id)
                                .order_by(DatasetVersion.seq)))


def version_holding_file(session: Session, *, tenant_id: str, file_id: str, at: int) -> DatasetVersion | None:
    """The newest version that held file_id at time `at` (registered by then, not deleted before)."""
    return session.scalar(select(DatasetVersion).where(
        DatasetVersion.tenant_id == tenant_id, DatasetVersion.file_id == file_id, DatasetVersion.created_at <= at,
        or_(DatasetVersion.deleted_at.is_(None), DatasetVersion.deleted_at >= at))
        .order_by(DatasetVersion.created_at.desc(), DatasetVersion.seq.desc()).limit(1))


# ---- aliases and tags -------------------------------------------------------------------------------


def aliases(session: Session, *, tenant_id: str, name: str) -> dict[str, int]:
    """alias -> version number, for one dataset name."""
    query = (select(DatasetAlias.alias, DatasetVersion.version)
             .join(DatasetVersion, DatasetVersion.id == DatasetAlias.version_id)
             .where(DatasetAlias.tenant_id == tenant_id, DatasetAlias.name == name).order_by(DatasetAlias.alias))
    return dict(session.execute(query).all())


def alias_target(session: Session, *, tenant_id: str, name: str, alias: str) -> DatasetVersion | None:
    query = (select(DatasetVersion).join(DatasetAlias, DatasetVersion.id == DatasetAlias.version_id)
             .where(DatasetAlias.tenant_id == tenant_id, DatasetAlias.name == name, DatasetAlias.alias == alias,
                    DatasetVersion.deleted_at.is_(None)))
    return session.scalar(query)


def set_alias(session: Session, *, version: DatasetVersion, alias: str) -> None:
    """Point alias at version (moving it when it points elsewhere)."""
    row = session.scalar(select(DatasetAlias).where(DatasetAlias.tenant_id == version.tenant_id,
                                                    DatasetAlias.name == version.name, DatasetAlias.alias == alias))
    if row is None:
        session.add(DatasetAlias(tenant_id=version.tenant_id, name=version.name, alias=alias, version_id=version.id,
                                 updated_at=now()))
    else:
        row.version_id, row.updated_at = version.id, now()
    session.flush()


def delete_alias(session: Session, *, tenant_id: str, name: str, alias: str) -> bool:
    result = session.execute(delete(DatasetAlias).where(DatasetAlias.tenant_id == tenant_id,
                                                        DatasetAlias.name == name, DatasetAlias.alias == alias))
    return result.rowcount > 0


def tags(session: Session, *, version: DatasetVersion) -> dict[str, str]:
    query = select(DatasetTag.key, DatasetTag.value).where(DatasetTag.version_id == version.id).order_by(DatasetTag.key)
    return dict(session.execute(query).all())


def set_tag(session: Session, *, version: DatasetVersion, key: str, value: str) -> None:
    row = session.scalar(select(DatasetTag).where(DatasetTag.version_id == version.id, DatasetTag.key == key))
    if row is None:
        session.add(DatasetTag(version_id=version.id, key=key, value=value))
    else:
        row.value = value
    session.flush()


def delete_tag(session: Session, *, version: DatasetVersion, key: str) -> bool:
    result = session.execute(delete(DatasetTag).where(DatasetTag.version_id == version.id, DatasetTag.key == key))
    return result.rowcount > 0


# ---- what jobs named --------------------------------------------------------------------------------


def record_job_dataset(session: Session, *, job_id: str, role: str, version_id: str) -> None:
    session.add(JobDataset(job_id=job_id, role=role, version_id=version_id))
    session.flush()


def job_dataset(session: Session, *, job: Job, role: str) -> DatasetVersion | None:
    """The version the job named for role (training, validation) at submission, deleted since or not."""
    return session.scalar(select(DatasetVersion).join(JobDataset, JobDataset.version_id == DatasetVersion.id)
                          .where(JobDataset.job_id == job.id, JobDataset.role == role,
                                 DatasetVersion.tenant_id == job.tenant_id))


# ---- deletion ---------------------------------------------------------------------------------------


def deletion_blockers(session: Session, *, version: DatasetVersion, active_statuses: tuple[str, ...]) -> list[str]:
    """Why the version cannot be deleted (empty: it can): the aliases on it, and the jobs not finished yet
    that train (or validate) on its file."""
    reasons = [f"alias {alias!r} points at it" for alias in session.scalars(
        select(DatasetAlias.alias).where(DatasetAlias.version_id == version.id).order_by(DatasetAlias.alias))]
    jobs = session.execute(select(Job.id, Job.status).where(
        Job.tenant_id == version.tenant_id, Job.status.in_(active_statuses),
        or_(Job.training_file == version.file_id, Job.validation_file == version.file_id)).order_by(Job.seq))
    reasons += [f"job {job_id} ({status}) trains on its file {version.file_id}" for job_id, status in jobs]
    return reasons


def delete_version(session: Session, *, version: DatasetVersion) -> None:
    """Mark the version deleted and forget its tags; the file it held is untouched (it has its own life)."""
    version.deleted_at = now()
    session.execute(delete(DatasetTag).where(DatasetTag.version_id == version.id))
    session.flush()
