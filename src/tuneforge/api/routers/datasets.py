"""/v1/registry/datasets: the tenant's dataset names, their immutable versions (each one a processed upload,
deduplicated by content), movable aliases and tags.

A version is addressed as v2 (or 2) or by its id (dsv_...); every lookup is the caller's tenant's (in
db/dataset_versions.py), so another tenant's name, version, alias, tag or file answers exactly like a
missing one. Reads need `read`; changes need `files` (a dataset is the tenant's data, as its uploads are).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Response
from sqlalchemy.exc import IntegrityError

from tuneforge.api.dependencies import Db, FilesCaller, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import page
from tuneforge.db import dataset_versions as dataset_rows
from tuneforge.db.tables import DatasetVersion
from tuneforge.registry.dataset_versions import (
    VERSION_NUMBER,
    DatasetError,
    check_name,
    delete_version as delete_dataset_version,
    find_reference,
    register_file,
)
from tuneforge.spec.api import AliasRequest, ListObject, TagRequest
from tuneforge.spec.datasets import (
    DatasetDeleted,
    DatasetVersionCreate,
    DatasetVersionObject,
    RegisteredDatasetObject,
)

router = APIRouter(prefix="/v1/registry/datasets", tags=["registry"])


def version_object(session, row: DatasetVersion) -> DatasetVersionObject:
    names = [alias for alias, number in dataset_rows.aliases(session, tenant_id=row.tenant_id, name=row.name).items()
             if number == row.version]
    source = None
    if row.source_version_id:
        parent = dataset_rows.version_any_state(session, tenant_id=row.tenant_id, version_id=row.source_version_id)
        source = {"id": row.source_version_id, "name": parent.name if parent else None,
                  "version": f"v{parent.version}" if parent else None}
    return DatasetVersionObject(
        id=row.id, name=row.name, version=f"v{row.version}", file_id=row.file_id, filename=row.filename,
        purpose=row.purpose, sha256=row.sha256, bytes=row.bytes, format=row.format, examples=row.examples,
        created_at=row.created_at, source_version=source, aliases=names,
        tags=dataset_rows.tags(session, version=row),
    )


def _name_exists(session, tenant_id: str, name: str) -> None:
    if not dataset_rows.has_versions(session, tenant_id=tenant_id, name=name):
        raise not_found("dataset", name, param="name")


def _version(session, tenant_id: str, name: str, version: str) -> DatasetVersion:
    _name_exists(session, tenant_id, name)
    row = None
    if version.startswith(dataset_rows.VERSION):
        row = dataset_rows.version_by_id(session, tenant_id=tenant_id, version_id=version)
    elif match := VERSION_NUMBER.fullmatch(version):  # ASCII digits that fit the integer column, nothing else
        row = dataset_rows.get_version(session, tenant_id=tenant_id, name=name, version=int(match.group(1)))
    if row is None or row.name != name:
        raise not_found("dataset version", version, param="version")
    return row


def _registered(session, tenant_id: str, name: str) -> RegisteredDatasetObject:
    versions, _ = dataset_rows.list_versions(session, tenant_id=tenant_id, name=name)
    if not versions:
        raise not_found("dataset", name, param="name")
    aliases = dataset_rows.aliases(session, tenant_id=tenant_id, name=name)
    return RegisteredDatasetObject(id=name, latest_version=f"v{versions[-1].version}", versions=len(versions),
                                   created_at=versions[0].created_at,
                                   aliases={alias: f"v{n}" for alias, n in aliases.items()})


@router.get("", response_model=ListObject)
def list_datasets(caller: Reader, db: Db, after: str | None = Query(None, max_length=64),
                  limit: int = Query(100, ge=1, le=1000)) -> ListObject:
    """The tenant's dataset names in name order (`after`: the last name of the previous page)."""
    with db.session() as session:
        rows, more = dataset_rows.list_names(session, tenant_id=caller.tenant_id, after=after, limit=limit)
        data = [RegisteredDatasetObject(
            id=name, latest_version=f"v{latest}", versions=count, created_at=created,
            aliases={alias: f"v{n}" for alias, n in dataset_rows.aliases(session, tenant_id=caller.tenant_id,
                                                                          name=name).items()})
            for name, latest, count, created in rows]
    return page(data, more)


@router.get("/{name}", response_model=RegisteredDatasetObject)
def get_dataset(name: str, caller: Reader, db: Db) -> RegisteredDatasetObject:
    with db.session() as session:
        return _registered(session, caller.tenant_id, name)


@router.get("/{name}/versions", response_model=ListObject)
def list_versions(name: str, caller: Reader, db: Db, after: str | None = Query(None, max_length=64),
                  limit: int = Query(100, ge=1, le=1000)) -> ListObject:
    """The name's versions, oldest first (`after`: the id of the last version of the previous page)."""
    with db.session() as session:
        _name_exists(session, caller.tenant_id, name)
        rows, more = dataset_rows.list_versions(session, tenant_id=caller.tenant_id, name=name, after=after,
                                                limit=limit)
        return page([version_object(session, row) for row in rows], more)


@router.post("/{name}/versions", response_model=DatasetVersionObject, status_code=201,
             responses={200: {"model": DatasetVersionObject,
                              "description": "The file's content is already the name's newest version: that version."}})
def register_version(name: str, body: DatasetVersionCreate, response: Response, caller: FilesCaller,
                     db: Db) -> DatasetVersionObject:
    """Register a processed file of the caller's as the next version of NAME (201), or answer the name's newest
    version when it already holds the same content (SHA-256; 200). The file's bytes are not copied."""
    try:
        check_name(name)
    except DatasetError as exc:
        raise ApiError(exc.status, exc.message, param="name", code=exc.code) from None
    for attempt in range(2):  # a registration racing for the same number loses once, then sees the winner
        try:
            with db.session() as session:
                row, created = _register(session, caller.tenant_id, name, body)
                response.status_code = 201 if created else 200
                return version_object(session, row)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _register(session, tenant_id: str, name: str, body: DatasetVersionCreate) -> tuple[DatasetVersion, bool]:
    file = dataset_rows.lock_live_file(session, tenant_id=tenant_id, file_id=body.file_id)
    if file is None:
        raise not_found("file", body.file_id, param="file_id")
    source = None
    if body.source_version is not None:
        try:
            source = find_reference(session, tenant_id=tenant_id, ref=body.source_version)
        except DatasetError as exc:
            raise ApiError(400, f"source_version: {exc.message}", param="source_version", code=exc.code) from None
    try:
        return register_file(session, file=file, name=name, source_version=source)
    except DatasetError as exc:
        raise ApiError(exc.status, exc.message, param="file_id", code=exc.code) from None


@router.get("/{name}/versions/{version}", response_model=DatasetVersionObject)
def get_version(name: str, version: str, caller: Reader, db: Db) -> DatasetVersionObject:
    with db.session() as session:
        return version_object(session, _version(session, caller.tenant_id, name, version))


@router.delete("/{name}/versions/{version}", response_model=DatasetDeleted)
def delete_version(name: str, version: str, caller: FilesCaller, db: Db) -> DatasetDeleted:
    """Delete a version (never its file, which keeps its own lifecycle); 409 dataset_in_use while an alias points
    at it or a job not finished yet trains on its file."""
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        try:
            delete_dataset_version(session, version=row)
        except DatasetError as exc:
            raise ApiError(exc.status, exc.message, param="version", code=exc.code) from None
        return DatasetDeleted(object="dataset.version", id=row.id)


@router.put("/{name}/aliases", response_model=RegisteredDatasetObject)
def set_alias(name: str, body: AliasRequest, caller: FilesCaller, db: Db) -> RegisteredDatasetObject:
    """Point an alias at a version, moving it from the one it named (jobs already created keep their file)."""
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, body.version)
        dataset_rows.set_alias(session, version=row, alias=body.alias)
        return _registered(session, caller.tenant_id, name)


@router.delete("/{name}/aliases/{alias}", response_model=DatasetDeleted)
def delete_alias(name: str, alias: str, caller: FilesCaller, db: Db) -> DatasetDeleted:
    with db.session() as session:
        _name_exists(session, caller.tenant_id, name)
        if not dataset_rows.delete_alias(session, tenant_id=caller.tenant_id, name=name, alias=alias):
            raise not_found("dataset alias", alias, param="alias")
    return DatasetDeleted(object="dataset.alias", id=alias)


@router.post("/{name}/versions/{version}/tags", response_model=DatasetVersionObject)
def set_tag(name: str, version: str, body: TagRequest, caller: FilesCaller, db: Db) -> DatasetVersionObject:
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        dataset_rows.set_tag(session, version=row, key=body.key, value=body.value)
        return version_object(session, row)


@router.delete("/{name}/versions/{version}/tags/{key}", response_model=DatasetDeleted)
def delete_tag(name: str, version: str, key: str, caller: FilesCaller, db: Db) -> DatasetDeleted:
    with db.session() as session:
        row = _version(session, caller.tenant_id, name, version)
        if not dataset_rows.delete_tag(session, version=row, key=key):
            raise not_found("dataset tag", key, param="key")
    return DatasetDeleted(object="dataset.tag", id=key)
