"""/v1/registry: the tenant's model names, their immutable versions with lineage, movable aliases and tags.

A version is addressed as v2 (or 2) or by its id (mv_...); every lookup is the caller's tenant's, so another
tenant's name, version, alias or tag answers exactly like a missing one.
"""

from __future__ import annotations

import re

from fastapi import APIRouter

from tuneforge.api.dependencies import Db, JobsCaller, Reader, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db.tables import ModelVersion
from tuneforge.home import tuneforge_home
from tuneforge.registry.exports import version_exports
from tuneforge.registry.models import RegistryError, delete_model_and_version, lineage_chain, remove_model_files
from tuneforge.spec.api import (
    AliasRequest,
    ListObject,
    ModelLineage,
    ModelVersionObject,
    RegisteredModelObject,
    RegistryDeleted,
    TagRequest,
)

router = APIRouter(prefix="/v1/registry", tags=["registry"])
VERSION_NUMBER = re.compile(r"v?[0-9]{1,9}")


def version_object(session, row: ModelVersion) -> ModelVersionObject:
    names = [alias for alias, number in version_rows.aliases(session, tenant_id=row.tenant_id, name=row.name).items()
             if number == row.version]
    return ModelVersionObject(
        id=row.id, name=row.name, version=f"v{row.version}", model=row.model_id, kind=row.kind,
        created_at=row.created_at, manifest_sha256=row.manifest_sha256, files=row.manifest["files"], aliases=names,
        tags=version_rows.tags(session, version_id=row.id), lineage=row.lineage,
    )


def _versions(session, tenant_id: str, name: str) -> list[ModelVersion]:
    versions = version_rows.list_versions(session, tenant_id=tenant_id, name=name)
    if not versions:
        raise not_found("registered model", name, param="name")
    return versions


def _version(session, tenant_id: str, name: str, version: str) -> ModelVersion:
    _versions(session, tenant_id, name)
    row = None
    if version.startswith(version_rows.VERSION):
        row = version_rows.version_by_id(session, tenant_id=tenant_id, version_id=version)
    elif VERSION_NUMBER.fullmatch(version):  # ASCII digits that fit the integer column, nothing else
        row = version_rows.get_version(session, tenant_id=tenant_id, name=name, version=int(version.removeprefix("v")))
    if row is None or row.name != name:
        raise not_found("model version", version, param="version")
    return row


@router.get("/models", response_model=ListObject)
def list_registered_models(caller: Reader, db: Db) -> ListObject:
    with db.session() as session:
        data = [RegisteredModelObject(
            id=name, latest_version=f"v{latest}", versions=count, created_at=created,
            aliases={alias: f"v{n}" for alias, n in version_rows.aliases(session, tenant_id=caller.tenant_id,
                                                                          name=name).items()})
            for name, latest, count, created in version_rows.list_names(session, tenant_id=caller.tenant_id)]
    return ListObject(data=data)


@router.get("/models/{name}", response_model=RegisteredModelObject)
def get_registered_model(name: str, caller: Reader, db: Db) -> RegisteredModelObject:
    with db.session() as session:
        versions = _versions(session, caller.tenant_id, name)
        aliases = version_rows.aliases(session, tenant_id=caller.tenant_id, name=name)
        return RegisteredModelObject(id=name, latest_version=f"v{versions[-1].version}", versions=len(versions),
                                     created_at=versions[0].created_at,
                                     aliases={alias: f"v{n}" for alias, n in aliases.items()})


@router.get("/models/{name}/versions", response_model=ListObject)
def list_versions(name: str, caller: Reader, db: Db) -> ListObject:
    with db.session() as session:
        return ListObject(data=[version_object(session, row) for row in _versions(session, caller.tenant_id, name)])


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionObject)
def get_version(name: str, version: str, caller: Reader, db: Db) -> ModelVersionObject:
    with db.session() as session:
        return version_object(session, _version(session, caller.tenant_id, name, version))


@router.get("/models/{name}/versions/{version}/lineage", response_model=ModelLineage)
def get_lineage(name: str, version: str, caller: Reader, db: Db, store: Store) -> ModelLineage:
    """The version, the version it was trained from, and so on down to the base model; and the exports made
    from the version (each one's own lineage: GET /v1/models/{model}/exports/{export_id})."""
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        return ModelLineage(id=row.id, chain=lineage_chain(session, version=row),
                            exports=version_exports(session, store, version=row))


@router.delete("/models/{name}/versions/{version}", response_model=RegistryDeleted)
def delete_version(name: str, version: str, caller: JobsCaller, db: Db) -> RegistryDeleted:
    """Delete a version (its ft: model, its checkpoints, its files once nothing else holds them); 409 while an
    alias or a job not finished yet uses it."""
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        model = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=row.model_id)
        try:
            delete_model_and_version(session, model=model)
        except RegistryError as exc:
            raise ApiError(exc.status, exc.message, param="version", code=exc.code) from None
        version_id, location = row.id, model.location
    remove_model_files(location=location, home=tuneforge_home())  # after the commit, as /v1/models does
    return RegistryDeleted(object="model.version", id=version_id)


@router.put("/models/{name}/aliases", response_model=RegisteredModelObject)
def set_alias(name: str, body: AliasRequest, caller: JobsCaller, db: Db) -> RegisteredModelObject:
    """Point an alias at a version, moving it from the one it named."""
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, body.version)
        version_rows.set_alias(session, version=row, alias=body.alias)
    return get_registered_model(name, caller, db)


@router.delete("/models/{name}/aliases/{alias}", response_model=RegistryDeleted)
def delete_alias(name: str, alias: str, caller: JobsCaller, db: Db) -> RegistryDeleted:
    with db.session() as session:
        _versions(session, caller.tenant_id, name)
        if not version_rows.delete_alias(session, tenant_id=caller.tenant_id, name=name, alias=alias):
            raise not_found("model alias", alias, param="alias")
    return RegistryDeleted(object="model.alias", id=alias)


@router.post("/models/{name}/versions/{version}/tags", response_model=ModelVersionObject)
def set_tag(name: str, version: str, body: TagRequest, caller: JobsCaller, db: Db) -> ModelVersionObject:
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        version_rows.set_tag(session, version_id=row.id, key=body.key, value=body.value)
        return version_object(session, row)


@router.delete("/models/{name}/versions/{version}/tags/{key}", response_model=RegistryDeleted)
def delete_tag(name: str, version: str, key: str, caller: JobsCaller, db: Db) -> RegistryDeleted:
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        if not version_rows.delete_tag(session, version_id=row.id, key=key):
            raise not_found("model tag", key, param="key")
    return RegistryDeleted(object="model.tag", id=key)
