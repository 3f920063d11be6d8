"""/v1/uploads: OpenAI's Uploads API, for files beyond one request. Create an upload with its declared
size, add parts (each streamed into the artifact store, never held in memory, 413 the moment the declared
size would be passed), then complete it: the parts are assembled in order, hashed (and checked against the
client's MD5), and become an ordinary File that the scheduler validates like one from POST /v1/files."""

from __future__ import annotations

import hashlib

import anyio
from fastapi import APIRouter, Request

from tuneforge.api.dependencies import Config, Db, FilesCaller, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import file_object
from tuneforge.api.uploads import receive_upload, upload_filename
from tuneforge.db import files as file_rows
from tuneforge.db import quotas
from tuneforge.db import tenants as tenant_rows
from tuneforge.db import uploads as upload_rows
from tuneforge.db.tables import Upload
from tuneforge.registry.artifacts import CHUNK, UploadTooLarge
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.spec.uploads import (MAX_PARTS, PART_MAX_BYTES, UPLOAD_MIME_TYPES, UploadComplete, UploadCreate,
                                    UploadObject, UploadPartObject)

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
PART_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string", "format": "binary"}},
}}}}}


def upload_object(session, row: Upload) -> UploadObject:
    file = file_rows.get_file(session, tenant_id=row.tenant_id, file_id=row.file_id) if row.file_id else None
    return UploadObject(id=row.id, bytes=row.bytes, created_at=row.created_at, expires_at=row.expires_at,
                        filename=row.filename, purpose=row.purpose, status=row.status,
                        file=file_object(file) if file is not None else None)


def _storage_room(session, tenant_id: str) -> int | None:
    """Bytes the tenant may still store; None without a storage quota."""
    tenant = tenant_rows.get_tenant(session, tenant_id=tenant_id)
    if tenant is None or tenant.max_storage_bytes is None:
        return None
    return max(0, tenant.max_storage_bytes - quotas.stored_bytes(session, tenant_id=tenant_id))


def _storage_full(tenant_id: str, size: int) -> ApiError:
    return ApiError(413, f"bytes: an upload of {size:,} bytes would pass tenant {tenant_id!r}'s storage quota "
                         "(max_storage_bytes); delete files or ask an admin to raise it", param="bytes",
                    code="storage_quota_exceeded")


def _pending(session, caller, upload_id: str) -> Upload:
    row = upload_rows.get_upload(session, tenant_id=caller.tenant_id, upload_id=upload_id)
    if row is None:
        raise not_found("upload", upload_id, param="upload_id")
    if row.status != upload_rows.PENDING:
        raise ApiError(400, f"upload {upload_id!r} is {row.status}; only a pending upload takes parts, "
                            "completes or cancels", param="upload_id", code="upload_not_pending")
    return row


@router.post("", response_model=UploadObject)
def create_upload(body: UploadCreate, caller: FilesCaller, db: Db, config: Config) -> UploadObject:
    """Create an upload of `bytes` bytes; it takes parts until it is completed, cancelled, or expires
    (TUNEFORGE_UPLOAD_EXPIRY_SECONDS after creation, one hour by default)."""
    # surrogatepass: a JSON string may hold a lone surrogate, which upload_filename then refuses as not UTF-8.
    filename = upload_filename(body.filename.encode("utf-8", "surrogatepass"), param="filename")
    if body.mime_type not in UPLOAD_MIME_TYPES:
        raise ApiError(400, f"mime_type {body.mime_type!r} is not accepted for a dataset; expected one of "
                            f"{', '.join(UPLOAD_MIME_TYPES)}", param="mime_type")
    if body.expires_after is not None:
        raise ApiError(400, "expires_after: tuneforge files do not expire (delete them instead); omit it",
                       param="expires_after")
    if body.bytes > config.uploads_max_bytes:
        raise ApiError(413, f"bytes: {body.bytes:,} is more than an upload may hold on this server "
                            f"({config.uploads_max_bytes:,} bytes)", param="bytes", code="file_too_large")
    with db.session() as session:
        room = _storage_room(session, caller.tenant_id)
        if room is not None and body.bytes > room:
            raise _storage_full(caller.tenant_id, body.bytes)
        row = upload_rows.create_upload(session, tenant_id=caller.tenant_id, filename=filename, purpose=body.purpose,
                                        mime_type=body.mime_type, size=body.bytes,
                                        expires_in_s=config.upload_expiry_seconds)
        return upload_object(session, row)


@router.post("/{upload_id}/parts", response_model=UploadPartObject, openapi_extra=PART_FORM)
async def add_part(upload_id: str, request: Request, caller: FilesCaller, db: Db, store: Store) -> UploadPartObject:
    """Add a part (multipart form field `data`, at most 64 MiB): streamed into the store, refused with a 413
    as soon as it would pass the upload's declared size."""
    def room() -> int:
        with db.session() as session:  # a write session: an upload past its deadline is marked expired
            row = _pending(session, caller, upload_id)
            return row.bytes - row.received_bytes

    left = await anyio.to_thread.run_sync(room)
    limit = min(PART_MAX_BYTES, left)
    try:
        part = await receive_upload(request, store, max_bytes=limit, tenant_id=caller.tenant_id, field="data")
    except ApiError as exc:
        if exc.code == "file_too_large":
            raise _past_size(upload_id, limit, left) from None
        raise
    try:
        if part.staged.size == 0:
            raise ApiError(400, "data: the part is empty", param="data", code="invalid_file")
        return await anyio.to_thread.run_sync(_record_part, db, store, caller, upload_id, part)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(part.discard)


def _past_size(upload_id: str, limit: int, left: int) -> ApiError:
    if limit < left:
        return ApiError(413, f"data: a part holds at most {PART_MAX_BYTES:,} bytes", param="data", code="file_too_large")
    return ApiError(413, f"data: this part passes upload {upload_id!r}'s declared size ({left:,} bytes are left)",
                    param="data", code="file_too_large")


def _record_part(db, store, caller, upload_id: str, part) -> UploadPartObject:
    with db.session() as session:
        row = _pending(session, caller, upload_id)
        if upload_rows.count_parts(session, upload_id=row.id) >= MAX_PARTS:
            raise ApiError(400, f"upload {upload_id!r} has {MAX_PARTS} parts already, the most one may have",
                           param="upload_id")
        store.commit(part.staged, session=session)  # the blob before the row: a part row never names missing bytes
        recorded = upload_rows.add_part(session, upload=row, size=part.staged.size, sha256=part.staged.sha256)
        if recorded is None:  # a concurrent part, a cancel or the deadline came first
            if row.status != upload_rows.PENDING:
                raise ApiError(400, f"upload {upload_id!r} is {row.status}", param="upload_id", code="upload_not_pending")
            raise _past_size(upload_id, part.staged.size, row.bytes - row.received_bytes)
        return UploadPartObject(id=recorded.id, created_at=recorded.created_at, upload_id=upload_id)


@router.post("/{upload_id}/complete", response_model=UploadObject)
async def complete_upload(upload_id: str, body: UploadComplete, caller: FilesCaller, db: Db, store: Store,
                          config: Config) -> UploadObject:
    """Complete the upload: its parts, in the order of part_ids, must add up to its declared size. They are
    assembled into one file (checked against md5 when given), which the scheduler then validates."""
    return await anyio.to_thread.run_sync(_complete, db, store, caller, upload_id, body)


def _complete(db, store, caller, upload_id: str, body: UploadComplete) -> UploadObject:
    if len(set(body.part_ids)) != len(body.part_ids):
        raise ApiError(400, "part_ids: a part is named more than once", param="part_ids")
    with db.session() as session:
        row = _pending(session, caller, upload_id)
        parts, unknown = upload_rows.parts_in_order(session, upload_id=row.id, part_ids=body.part_ids)
        size, purpose, filename = row.bytes, row.purpose, row.filename
        contents = [store.find_content(session, tenant_id=caller.tenant_id, sha256=p.sha256, holder=p.id) for p in parts]
    if unknown:
        raise ApiError(400, f"part_ids: {', '.join(unknown[:5])} {'is not a part' if len(unknown) == 1 else 'are not parts'} "
                            f"of upload {upload_id!r}", param="part_ids")
    total = sum(p.bytes for p in parts)
    if total != size:
        raise ApiError(400, f"part_ids: the parts hold {total:,} bytes; upload {upload_id!r} declared {size:,}",
                       param="part_ids", code="upload_size_mismatch")
    writer = store.open_staging(max_bytes=size, tenant_id=caller.tenant_id)
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        for content in contents:  # one chunk in memory at a time, however large the file (decrypted as read)
            if content is None:
                raise ApiError(400, f"part_ids: a part of upload {upload_id!r} has lost its bytes", param="part_ids")
            with store.open_content(content) as source:
                while chunk := source.read(CHUNK):
                    md5.update(chunk)
                    writer.write(chunk)
        staged = writer.finish()
        if body.md5 is not None and body.md5.lower() != md5.hexdigest():
            raise ApiError(400, f"md5: the assembled file's MD5 is {md5.hexdigest()}, not {body.md5}; the upload "
                                "stays pending", param="md5", code="checksum_mismatch")
        return _store_file(db, store, caller, upload_id, staged, filename=filename, purpose=purpose)
    except UploadTooLarge:
        raise ApiError(400, "part_ids: the parts hold more bytes than declared", param="part_ids") from None
    except KeyUnavailable:  # a part's bytes were sealed under a tenant key since destroyed
        raise ApiError(410, f"part_ids: a part of upload {upload_id!r} can no longer be read: the tenant's encryption "
                            "key was destroyed (crypto-shredded); upload it again", param="part_ids",
                       code="content_shredded") from None
    finally:
        writer.discard()


def _store_file(db, store, caller, upload_id: str, staged, *, filename: str, purpose: str) -> UploadObject:
    with db.session() as session:
        # Checked again under the tenant's lock: concurrent uploads cannot pass the quota together.
        tenant_rows.lock_tenant(session, tenant_id=caller.tenant_id)
        room = _storage_room(session, caller.tenant_id)
        if room is not None and staged.size > room:
            raise _storage_full(caller.tenant_id, staged.size)
        store.commit(staged, session=session)
        file = file_rows.create_file(session, tenant_id=caller.tenant_id, filename=filename, purpose=purpose,
                                     size=staged.size, sha256=staged.sha256, report={}, status=file_rows.UPLOADED,
                                     status_details=None)
        row = _pending(session, caller, upload_id)
        if not upload_rows.complete(session, upload=row, file_id=file.id):
            raise ApiError(400, f"upload {upload_id!r} is {row.status}", param="upload_id", code="upload_not_pending")
        return upload_object(session, row)


@router.post("/{upload_id}/cancel", response_model=UploadObject)
def cancel_upload(upload_id: str, caller: FilesCaller, db: Db) -> UploadObject:
    """Cancel a pending upload: it takes no more parts, and its parts' bytes are removed."""
    with db.session() as session:
        row = _pending(session, caller, upload_id)
        if not upload_rows.cancel(session, upload=row):
            raise ApiError(400, f"upload {upload_id!r} is {row.status}", param="upload_id", code="upload_not_pending")
        return upload_object(session, row)
