"""Exports of fine-tuned models (the Exports API): each row names the job (method export) that makes it; once
it succeeded, the registry blobs it owns are its files and its lineage (registry/exports.py)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.tables import Job, ModelExport, ObjectLink, RegistryBlob

EXPORT = "export_"


def create_export(session: Session, *, tenant_id: str, model_id: str, job_id: str) -> ModelExport:
    row = ModelExport(id=new_id(EXPORT), tenant_id=tenant_id, model_id=model_id, job_id=job_id, created_at=now())
    session.add(row)
    session.flush()
    return row


def get_export(session: Session, *, tenant_id: str, model_id: str, export_id: str) -> tuple[ModelExport, Job] | None:
    """The tenant's export of model_id with its job; another tenant's (or another model's) answers None."""
    found = session.execute(select(ModelExport, Job).join(Job, Job.id == ModelExport.job_id).where(
        ModelExport.id == export_id, ModelExport.tenant_id == tenant_id, ModelExport.model_id == model_id)).first()
    return (found[0], found[1]) if found else None


def list_exports(session: Session, *, tenant_id: str, model_id: str) -> list[tuple[ModelExport, Job]]:
    rows = session.execute(select(ModelExport, Job).join(Job, Job.id == ModelExport.job_id).where(
        ModelExport.tenant_id == tenant_id, ModelExport.model_id == model_id).order_by(ModelExport.seq))
    return [(export, job) for export, job in rows]


def export_of_job(session: Session, *, job_id: str) -> ModelExport | None:
    return session.scalar(select(ModelExport).where(ModelExport.job_id == job_id))


def delete_export(session: Session, *, export: ModelExport) -> None:
    """Forget an export: the registry blobs it owns (the blob collector removes those nothing else holds), the
    object-store links of its job's published export files (the store's collector removes the objects), and its
    row. Its job's row stays (usage is accounted to it); the caller removes DIR/export after the commit."""
    session.execute(delete(RegistryBlob).where(RegistryBlob.owner == export.id).execution_options(synchronize_session=False))
    session.execute(delete(ObjectLink).where(ObjectLink.owner == export.job_id, ObjectLink.kind == "export")
                    .execution_options(synchronize_session=False))
    session.execute(delete(ModelExport).where(ModelExport.id == export.id).execution_options(synchronize_session=False))


def exports_of_model(session: Session, *, tenant_id: str, model_id: str) -> list[ModelExport]:
    return list(session.scalars(select(ModelExport).where(ModelExport.tenant_id == tenant_id,
                                                          ModelExport.model_id == model_id)))


def get_export_any_model(session: Session, *, tenant_id: str, export_id: str) -> ModelExport | None:
    """The tenant's export by its id alone (the CLI names an export by id; another tenant's answers None)."""
    return session.scalar(select(ModelExport).where(ModelExport.id == export_id, ModelExport.tenant_id == tenant_id))


def record_artifact(session: Session, *, export_id: str, files: list[dict]) -> None:
    """The export's files as registry blobs it owns ({"path", "sha256", "bytes"} each): the collector keeps them."""
    session.execute(delete(RegistryBlob).where(RegistryBlob.owner == export_id))  # a retried registration: once
    for entry in files:
        session.add(RegistryBlob(owner=export_id, path=entry["path"], sha256=entry["sha256"], bytes=entry["bytes"]))
    session.flush()


def artifact_files(session: Session, *, export_id: str) -> list[dict]:
    rows = session.scalars(select(RegistryBlob).where(RegistryBlob.owner == export_id).order_by(RegistryBlob.path))
    return [{"path": row.path, "sha256": row.sha256, "bytes": row.bytes} for row in rows]
