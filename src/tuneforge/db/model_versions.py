"""The model registry's rows: versions of a tenant's model names, their aliases and tags, the base models
an admin registered, and which blobs each of them holds (what the blob collector asks)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.tables import FineTunedModel, Job, ModelAlias, ModelTag, ModelVersion, RegisteredBaseModel, RegistryBlob

VERSION = "mv_"
BASE_OWNER = "base:"


def _blob_rows(session: Session, *, owner: str, manifest: dict[str, Any]) -> None:
    for entry in manifest["files"]:
        session.add(RegistryBlob(owner=owner, path=entry["path"], sha256=entry["sha256"], bytes=entry["bytes"]))


def create_version(session: Session, *, tenant_id: str, name: str, model_id: str, job_id: str | None, kind: str,
                   manifest: dict[str, Any], manifest_sha256: str, lineage: dict[str, Any]) -> ModelVersion:
    """The next version of name (v1 when it is new). Two registrations racing for one number: the unique
    constraint refuses the second, whose transaction rolls back."""
    latest = session.scalar(select(func.max(ModelVersion.version)).where(
        ModelVersion.tenant_id == tenant_id, ModelVersion.name == name))
    row = ModelVersion(id=new_id(VERSION), tenant_id=tenant_id, name=name, version=(latest or 0) + 1,
                       model_id=model_id, job_id=job_id, kind=kind, manifest=manifest,
                       manifest_sha256=manifest_sha256, lineage=lineage, created_at=now())
    session.add(row)
    _blob_rows(session, owner=row.id, manifest=manifest)
    session.flush()
    return row


def _live(tenant_id: str):
    return (ModelVersion.tenant_id == tenant_id, ModelVersion.deleted_at.is_(None))


def list_names(session: Session, *, tenant_id: str) -> list[tuple[str, int, int, int]]:
    """(name, newest version, live versions, created) of each of the tenant's model names."""
    query = (select(ModelVersion.name, func.max(ModelVersion.version), func.count(), func.min(ModelVersion.created_at))
             .where(*_live(tenant_id)).group_by(ModelVersion.name).order_by(ModelVersion.name))
    return [tuple(row) for row in session.execute(query)]


def list_versions(session: Session, *, tenant_id: str, name: str) -> list[ModelVersion]:
    query = select(ModelVersion).where(*_live(tenant_id), ModelVersion.name == name)
    return list(session.scalars(query.order_by(ModelVersion.version)))


def get_version(session: Session, *, tenant_id: str, name: str, version: int) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(*_live(tenant_id), ModelVersion.name == name,
                                                     ModelVersion.version == version))


def version_of_model(session: Session, *, tenant_id: str, model_id: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(*_live(tenant_id), ModelVersion.model_id == model_id))


def version_by_id(session: Session, *, tenant_id: str, version_id: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(*_live(tenant_id), ModelVersion.id == version_id))


# ---- aliases and tags -------------------------------------------------------------------------------


def aliases(session: Session, *, tenant_id: str, name: str) -> dict[str, int]:
    """alias -> version number, for one model name."""
    query = (select(ModelAlias.alias, ModelVersion.version).join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
             .where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name).order_by(ModelAlias.alias))
    return dict(session.execute(query).all())


def alias_target(session: Session, *, tenant_id: str, name: str, alias: str) -> ModelVersion | None:
    query = (select(ModelVersion).join(ModelAlias, ModelVersion.id == ModelAlias.version_id)
             .where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name, ModelAlias.alias == alias))
    return session.scalar(query)


def set_alias(session: Session, *, version: ModelVersion, alias: str) -> None:
    """Point alias at version (moving it when it points elsewhere)."""
    row = session.scalar(select(ModelAlias).where(ModelAlias.tenant_id == version.tenant_id,
                                                  ModelAlias.name == version.name, ModelAlias.alias == alias))
    if row is None:
        session.add(ModelAlias(tenant_id=version.tenant_id, name=version.name, alias=alias, version_id=version.id,
                               updated_at=now()))
    else:
        row.version_id, row.updated_at = version.id, now()
    session.flush()


def delete_alias(session: Session, *, tenant_id: str, name: str, alias: str) -> bool:
    result = session.execute(delete(ModelAlias).where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name,
                                                      ModelAlias.alias == alias))
    return result.rowcount > 0


def tags(session: Session, *, version_id: str) -> dict[str, str]:
    query = select(ModelTag.key, ModelTag.value).where(ModelTag.version_id == version_id).order_by(ModelTag.key)
    return dict(session.execute(query).all())


def set_tag(session: Session, *, version_id: str, key: str, value: str) -> None:
    row = session.scalar(select(ModelTag).where(ModelTag.version_id == version_id, ModelTag.key == key))
    if row is None:
        session.add(ModelTag(version_id=version_id, key=key, value=value))
    else:
        row.value = value
    session.flush()


def delete_tag(session: Session, *, version_id: str, key: str) -> bool:
    result = session.execute(delete(ModelTag).where(ModelTag.version_id == version_id, ModelTag.key == key))
    return result.rowcount > 0


# ---- deletion ---------------------------------------------------------------------------------------


def deletion_blockers(session: Session, *, version: ModelVersion, active_statuses: tuple[str, ...],
                      uses_model) -> list[str]:
    """Why the version cannot be deleted (empty: it can): the aliases on it, the jobs not finished yet
    that train from it or use it as a reward or judge model (uses_model(spec dict, model id) tells), and
    the adapter versions trained on it."""
    reasons = [f"alias {alias!r} points at it" for alias in session.scalars(
        select(ModelAlias.alias).where(ModelAlias.version_id == version.id).order_by(ModelAlias.alias))]
    jobs = session.execute(select(Job.id, Job.status, Job.spec).where(
        Job.tenant_id == version.tenant_id, Job.status.in_(active_statuses)).order_by(Job.seq))
    reasons += [f"job {job_id} ({status}) uses it" for job_id, status, spec in jobs if uses_model(spec, version.model_id)]
    # An adapter trained on this version applies to it: without it the adapter is a delta on nothing.
    adapters = session.scalars(select(ModelVersion).where(*_live(version.tenant_id), ModelVersion.kind == "adapter",
                                                          ModelVersion.id != version.id).order_by(ModelVersion.seq))
    reasons += [f"{row.name} v{row.version} is an adapter trained on it" for row in adapters
                if _trained_on(row, version.model_id)]
    return reasons


def _trained_on(row: ModelVersion, model_id: str) -> bool:
    """Whether the version was trained from model_id or from one of its kept checkpoints (ft:...:ckpt-step-N)."""
    ref = (row.lineage.get("base_model") or {}).get("ref") or ""
    return ref == model_id or ref.startswith(model_id + ":ckpt-step-")


def delete_version(session: Session, *, version: ModelVersion) -> None:
    """Mark the version deleted and let go of its blobs (the collector removes those nothing else holds)."""
    version.deleted_at = now()
    session.execute(delete(ModelTag).where(ModelTag.version_id == version.id))
    session.execute(delete(RegistryBlob).where(RegistryBlob.owner == version.id))


def blob_referenced(session: Session, *, sha256: str) -> bool:
    """Whether a registered version or base model holds the blob."""
    return session.scalar(select(RegistryBlob.seq).where(RegistryBlob.sha256 == sha256).limit(1)) is not None


# ---- base models an admin registered ----------------------------------------------------------------


def create_base_model(session: Session, *, name: str, manifest: dict[str, Any], manifest_sha256: str) -> RegisteredBaseModel:
    row = RegisteredBaseModel(name=name, manifest=manifest, manifest_sha256=manifest_sha256, created_at=now())
    session.add(row)
    _blob_rows(session, owner=BASE_OWNER + name, manifest=manifest)
    session.flush()
    return row


def get_base_model(session: Session, *, name: str) -> RegisteredBaseModel | None:
    return session.scalar(select(RegisteredBaseModel).where(RegisteredBaseModel.name == name))


def list_base_models(session: Session) -> list[RegisteredBaseModel]:
    return list(session.scalars(select(RegisteredBaseModel).order_by(RegisteredBaseModel.name)))


def base_model_blockers(session: Session, *, name: str, active_statuses: tuple[str, ...], names_model) -> list[str]:
    """Why the registered base model cannot be deleted (empty: it can), across every tenant (a base model is
    shared): the jobs not finished yet whose spec names it (names_model(spec dict, name) tells), and the live
    adapters trained on it (a version's lineage, or a model row from before versions): each is a delta on it.
    A full-model version trained on it needs it no more; its lineage keeps the base's name and digest."""
    jobs = session.execute(select(Job.id, Job.status, Job.tenant_id, Job.spec).where(
        Job.status.in_(active_statuses)).order_by(Job.seq))
    reasons = [f"job {job_id} ({status}) of tenant {tenant} uses it" for job_id, status, tenant, spec in jobs
               if names_model(spec, name)]
    adapters = session.scalars(select(ModelVersion).where(ModelVersion.deleted_at.is_(None),
                                                          ModelVersion.kind == "adapter").order_by(ModelVersion.seq))
    reasons += [f"{row.name} v{row.version} of tenant {row.tenant_id} is an adapter trained on it" for row in adapters
                if (row.lineage.get("base_model") or {}).get("kind") == "registered"
                and row.lineage["base_model"].get("ref") == name]
    has_version = select(ModelVersion.seq).where(ModelVersion.model_id == FineTunedModel.id).exists()
    unversioned = session.scalars(select(FineTunedModel.id).where(
        FineTunedModel.deleted_at.is_(None), FineTunedModel.kind == "adapter", FineTunedModel.base_model == name,
        ~has_version).order_by(FineTunedModel.seq))
    reasons += [f"{model_id} is an adapter trained on it" for model_id in unversioned]
    return reasons


def delete_base_model(session: Session, *, base: RegisteredBaseModel) -> None:
    """Forget the registered base model and let go of its blobs (the collector removes those nothing else
    holds; its objects in the object store go once no registered base model has its digest). The name is
    free again afterwards."""
    session.execute(delete(RegistryBlob).where(RegistryBlob.owner == BASE_OWNER + base.name))
    session.delete(base)
    session.flush()
