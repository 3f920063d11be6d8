"""/v1/files: upload (streamed into the content-addressed store, sealed for its tenant; validated afterwards
by the scheduler), list, retrieve, delete, content (decrypted as it streams out); and the native dataset
report of a file (/v1/files/{id}/validation)."""

from __future__ import annotations

import logging
from typing import Literal
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from tuneforge.api.dependencies import Config, Db, FilesCaller, Reader, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import dataset_report, file_object, page
from tuneforge.api.uploads import Upload, receive_upload
from tuneforge.db import files as file_rows
from tuneforge.db import quotas
from tuneforge.db import tenants as tenant_rows
from tuneforge.registry.artifacts import CHUNK, ContentMissing
from tuneforge.registry.dataset_versions import file_blockers
from tuneforge.registry.sweep_holds import sweeps_using_file
from tuneforge.registry.storage.envelope import DecryptionFailed
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.spec.api import DatasetReport, FileDeleted, FileObject, ListObject

log = logging.getLogger("tuneforge.api.files")
router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune", "evals")  # evals: items of an eval run (validated as eval items, not training data)
UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": list(PURPOSES)}},
}}}}}


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_FORM)
async def upload_file(request: Request, caller: FilesCaller, db: Db, store: Store, config: Config) -> FileObject:
    """Upload a file. It is "uploaded" until the scheduler has validated it, then "processed" or "error"
    (with the reason in status_details and every problem in /v1/files/{id}/validation)."""
    # The tenant's storage quota bounds the stream like the upload limit does: a 413 as soon as it passes.
    room = await anyio.to_thread.run_sync(_storage_room, db, caller.tenant_id)
    try:
        upload = await receive_upload(request, store, max_bytes=min(config.max_upload_bytes, room),
                                      tenant_id=caller.tenant_id)
    except ApiError as exc:
        if exc.code == "file_too_large" and room < config.max_upload_bytes:
            raise _storage_full(caller.tenant_id) from None
        raise
    try:
        if upload.purpose is None:
            raise ApiError(400, "purpose: required parameter is missing", param="purpose")
        if upload.purpose not in PURPOSES:
            raise ApiError(400, f"purpose {upload.purpose!r} is not supported; expected one of {', '.join(PURPOSES)}",
                           param="purpose")
        return await anyio.to_thread.run_sync(_store_upload, db, store, caller.tenant_id, upload)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(upload.discard)


def _storage_room(db, tenant_id: str) -> int:
    """Bytes the tenant may still store (a very large number without a quota)."""
    with db.read_session() as session:
        tenant = tenant_rows.get_tenant(session, tenant_id=tenant_id)
        if tenant is None or tenant.max_storage_bytes is None:
            return 1 << 62
        return max(0, tenant.max_storage_bytes - quotas.stored_bytes(session, tenant_id=tenant_id))


def _storage_full(tenant_id: str) -> ApiError:
    return ApiError(413, f"file: this upload would pass tenant {tenant_id!r}'s storage quota (max_storage_bytes); "
                         "delete files or ask an admin to raise it", param="file", code="storage_quota_exceeded")


def _store_upload(db, store, tenant_id: str, upload: Upload) -> FileObject:
    with db.session() as session:
        # Checked again under the tenant's lock: concurrent uploads cannot pass the quota together.
        tenant_rows.lock_tenant(session, tenant_id=tenant_id)
        tenant = tenant_rows.get_tenant(session, tenant_id=tenant_id)
        if tenant is not None and tenant.max_storage_bytes is not None and \
                quotas.stored_bytes(session, tenant_id=tenant_id) + upload.staged.size > tenant.max_storage_bytes:
            raise _storage_full(tenant_id)
        store.commit(upload.staged, session=session)  # the blob before the row: a row never names bytes not there
        row = file_rows.create_file(
            session, tenant_id=tenant_id, filename=upload.filename, purpose=upload.purpose, size=upload.staged.size,
            sha256=upload.staged.sha256, report={}, status=file_rows.UPLOADED, status_details=None,
        )
        return file_object(row)


@router.get("", response_model=ListObject)
def list_files(caller: Reader, db: Db, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
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
def get_file(file_id: str, caller: Reader, db: Db) -> FileObject:
    with db.session() as session:
        return file_object(_file(session, caller, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, caller: FilesCaller, db: Db) -> FileDeleted:
    """Delete the file. Its bytes stay while anything refers to them (another tenant's copy of the same
    content, a job that may still run on it); the scheduler's collector removes them afterwards. 409
    file_in_use while a live dataset version holds it (delete the version first) or a running sweep trains on it
    (its later trials would name it)."""
    with db.session() as session:
        file = _file(session, caller, file_id)
        if blockers := file_blockers(session, file=file) + sweeps_using_file(session, tenant_id=caller.tenant_id,
                                                                             file_id=file_id):
            raise ApiError(409, f"file {file_id} cannot be deleted: {'; '.join(blockers)}", param="file_id",
                           code="file_in_use")
        file_rows.delete_file(session, file=file)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, caller: Reader, db: Db, store: Store):
    """The file's bytes as uploaded. A sealed upload is decrypted as it streams out, one authenticated
    1 MiB chunk at a time (no plaintext copy on disk, memory bounded whatever the size); 410 when the
    tenant's key was destroyed (crypto-shredded)."""
    with db.read_session() as session:
        row = _file(session, caller, file_id)
        content = store.find_content(session, tenant_id=caller.tenant_id, sha256=row.sha256, holder=row.id)
    if content is None:
        raise not_found("file content", file_id, param="file_id")
    if not content.sealed:  # an upload from before sealing (or with encryption at rest off)
        return FileResponse(content.path, media_type="application/octet-stream", filename=row.filename)
    try:
        reader = store.open_content(content)
    except ContentMissing:
        raise not_found("file content", file_id, param="file_id") from None
    except KeyUnavailable:
        raise ApiError(410, f"the content of {file_id} can no longer be read: tenant {caller.tenant_id}'s encryption "
                            "key was destroyed (crypto-shredded)", param="file_id", code="content_shredded") from None
    except DecryptionFailed:
        log.error("file %s: its sealed blob does not authenticate", file_id)
        raise ApiError(500, f"the content of {file_id} is damaged in storage and cannot be read", param="file_id",
                       code="content_damaged", type="server_error") from None
    return StreamingResponse(_plaintext_chunks(reader, file_id), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes),
                                      "Content-Disposition": _attachment(row.filename)})


def _plaintext_chunks(reader, file_id: str):
    """The decrypted bytes chunk by chunk (Starlette iterates this in a worker thread). A chunk that does
    not authenticate ends the response early; with Content-Length set, the client sees it cut short."""
    try:
        while chunk := reader.read(CHUNK):
            yield chunk
    except DecryptionFailed:
        log.error("file %s: its sealed blob stopped authenticating mid-download; the response is cut short", file_id)
        raise
    finally:
        reader.close()


def _attachment(filename: str) -> str:
    """Content-Disposition as Starlette's FileResponse writes it (RFC 6266 filename* for non-ASCII names)."""
    quoted = quote(filename)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'


@router.get("/{file_id}/validation", response_model=DatasetReport)
def file_validation(file_id: str, caller: Reader, db: Db) -> DatasetReport:
    """tuneforge: the dataset report of a file -- format, statistics, and every problem by line."""
    with db.session() as session:
        return dataset_report(_file(session, caller, file_id))
