"""Exports of fine-tuned models (the Exports API): each row names the job (method export) that makes it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.tables import Job, ModelExport

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
