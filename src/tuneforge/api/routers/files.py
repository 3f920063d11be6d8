"""/v1/files: upload (validated and stored content-addressed), list, retrieve, delete, content; and the
native dataset report of a file (/v1/files/{id}/validation)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from tuneforge.api.dependencies import Caller, Config, Db, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import dataset_report, file_object, page
from tuneforge.db import files as file_rows
from tuneforge.registry.artifacts import UploadTooLarge
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.spec.api import ACTIVE_STATUSES, DatasetReport, FileDeleted, FileObject, ListObject

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)


@router.post("", response_model=FileObject)
def upload_file(caller: Caller, db: Db, store: Store, config: Config,
                file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose {purpose!r} is not supported; expected one of {', '.join(PURPOSES)}", param="purpose")
    filename = (file.filename or "upload.jsonl").replace("/", "_")[:255]
    try:
        with store.staging(file.file, filename=filename, max_bytes=config.max_upload_bytes) as staged:
            report = inspect_dataset(staged.path, display_name=filename)
            store.commit(staged)
    except UploadTooLarge as exc:
        raise ApiError(413, str(exc), param="file", code="file_too_large") from None
    with db.session() as session:
        row = file_rows.create_file(
            session, tenant_id=caller.tenant_id, filename=filename, purpose=purpose, size=staged.size,
            sha256=staged.sha256, report=report.model_dump(mode="json"), status="processed" if report.valid else "error",
            status_details=None if report.valid else report.summary[:2000],
        )
        return file_object(row)


@router.get("", response_model=ListObject)
def list_files(caller: Caller, db: Db, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> ListObject:
    with db.session() as session:
        rows, more = file_rows.list_files(session, tenant_id=caller.tenant_id, limit=limit, after=after, order=order,
                                          purpose=purpose)
        return page([file_object(r) for r in rows], more)


def _file(session, caller, file_id: str):
    row = file_rows.get_file(session, tenant_id=caller.tenant_id, file_id=file_id)
    if row is None:
        raise not_found("file", file_id, param="file_id")
    return row


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, caller: Caller, db: Db) -> FileObject:
    with db.session() as session:
        return file_object(_file(session, caller, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, caller: Caller, db: Db, store: Store) -> FileDeleted:
    with db.session() as session:
        row = _file(session, caller, file_id)
        last_copy = file_rows.delete_file(session, file=row)
        in_use = file_rows.file_in_use(session, file_id=file_id, active_statuses=ACTIVE_STATUSES)
        sha256 = row.sha256
    if last_copy and not in_use:
        store.delete(sha256)  # after the commit: a failed delete leaves a blob, never a row without one
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, caller: Caller, db: Db, store: Store) -> FileResponse:
    with db.session() as session:
        row = _file(session, caller, file_id)
    if not store.exists(row.sha256):
        raise not_found("file content", file_id, param="file_id")
    return FileResponse(store.path_of(row.sha256), media_type="application/octet-stream", filename=row.filename)


@router.get("/{file_id}/validation", response_model=DatasetReport)
def file_validation(file_id: str, caller: Caller, db: Db) -> DatasetReport:
    """tuneforge: the dataset report of a file -- format, statistics, and every problem by line."""
    with db.session() as session:
        return dataset_report(_file(session, caller, file_id))
