"""Fine-tuned models produced by jobs, per tenant (the registry issue adds versions, lineage and aliases)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.tables import FineTunedModel, JobCheckpoint


def create_model(
    session: Session, *, model_id: str, tenant_id: str, job_id: str, base_model: str, kind: str, location: str
) -> FineTunedModel:
    row = FineTunedModel(
        id=model_id, tenant_id=tenant_id, job_id=job_id, base_model=base_model, kind=kind, location=location,
        created_at=now(),
    )
    session.add(row)
    session.flush()
    return row


def get_model(session: Session, *, tenant_id: str, model_id: str) -> FineTunedModel | None:
    return session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.tenant_id == tenant_id, FineTunedModel.deleted_at.is_(None)
        )
    )


def list_models(session: Session, *, tenant_id: str) -> list[FineTunedModel]:
    query = select(FineTunedModel).where(FineTunedModel.tenant_id == tenant_id, FineTunedModel.deleted_at.is_(None))
    return list(session.scalars(query.order_by(FineTunedModel.seq)))


def delete_model(session: Session, *, model: FineTunedModel) -> None:
    """Mark the model deleted and forget its job's checkpoints (their files go with the model's)."""
    model.deleted_at = now()
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == model.job_id))
