"""Receive a multipart upload as a stream, into the artifact store's staging, under a byte limit.

Starlette's UploadFile spools the whole body to a temporary file before the endpoint runs, so a limit
checked there comes after the disk has taken it all. Here a body is refused with a 413 on its
Content-Length before a byte is read, or, without one (chunked), the moment the streamed bytes pass the
limit; the file part is hashed and written as it arrives, off the event loop, sealed (encrypted under a
data key of its own) before it reaches the disk when the store seals uploads. The file's name is checked
when its part headers arrive, before any of its bytes are kept.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from tuneforge.api.errors import ApiError
from tuneforge.registry.artifacts import LocalArtifactStore, StagedBlob, StagingWriter, UploadTooLarge

MULTIPART_OVERHEAD = 64 << 10  # boundaries, part headers and the purpose field around the file's bytes
WRITE_BATCH = 1 << 20  # bytes gathered before one write (and hash) in a worker thread
MAX_FIELD_BYTES = 1 << 10  # a form field other than the file (purpose) is a short word
MAX_FILENAME_BYTES = 255  # what a POSIX file system allows for one name (the column holds 255 too)


def too_large(max_bytes: int, *, param: str = "file") -> ApiError:
    return ApiError(413, str(UploadTooLarge(max_bytes)), param=param, code="file_too_large")


def _bad_file(message: str, *, param: str = "file") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_file")


def upload_filename(raw: bytes | None, *, param: str = "file") -> str:
    """The upload's name, or a 400 naming the file parameter: a name, not a path, and one a file system
    and the database can hold."""
    if raw is None:
        raise _bad_file("expected a file upload with a filename", param=param)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_file("the filename is not UTF-8", param=param) from None
    if not name:
        raise _bad_file("the filename is empty", param=param)
    if name in (".", ".."):
        raise _bad_file(f"{name!r} is not a file name", param=param)
    if "/" in name or "\\" in name:
        raise _bad_file("the filename must be a name, not a path (no / or \\)", param=param)
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise _bad_file(f"the filename contains a control character (U+{ord(control):04X})", param=param)
    size = len(name.encode("utf-8"))
    if size > MAX_FILENAME_BYTES:
        raise _bad_file(f"the filename is {size} bytes in UTF-8; at most {MAX_FILENAME_BYTES} are allowed", param=param)
    return name


@dataclass
class Upload:
    """A received upload: its name, its purpose field, and its bytes staged (discard() when done)."""

    filename: str
    purpose: str | None
    staged: StagedBlob
    writer: StagingWriter

    def discard(self) -> None:
        self.writer.discard()


@dataclass
class _Parts:
    """The multipart parser's callbacks: the current part's headers, the form fields, and the file's
    bytes waiting to be written. Errors are kept and raised after each parser.write().

    file_field is the form field that carries the bytes: "file" for POST /v1/files (its filename checked and
    kept), "data" for a part of an Upload (the Upload has the name; a part's filename is not kept)."""

    file_field: str = "file"
    file_bytes: int = 0
    filename: str | None = None
    fields: dict[str, bytearray] = field(default_factory=dict)
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0
    ended: bool = False
    error: ApiError | None = None
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _header: tuple[bytearray, bytearray] = field(default_factory=lambda: (bytearray(), bytearray()))
    _in: str | None = None  # "file", a field's name, or None for a part that is ignored

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": lambda d, s, e: self._header[0].extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header[1].extend(d[s:e]), "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data, "on_end": self._end,
        }

    def take(self) -> bytes:
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return data

    def _part_begin(self) -> None:
        self._headers.clear()
        self._in = None

    def _header_end(self) -> None:
        name, value = self._header
        self._headers[bytes(name).strip().lower()] = bytes(value).strip()
        name.clear()
        value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if name == self.file_field:
            if self.filename is not None:
                self.error = self.error or _bad_file("expected one file per upload", param=self.file_field)
                return
            try:
                self.filename = upload_filename(options.get(b"filename")) if self.file_field == "file" else ""
            except ApiError as exc:
                self.error = self.error or exc
                return
            self._in = "file"
        elif name:
            self._in = name
            self.fields[name] = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in == "file":
            self.file_bytes += end - start
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        elif self._in is not None:
            value = self.fields[self._in]
            value.extend(data[start:end])
            if len(value) > MAX_FIELD_BYTES:
                self.error = self.error or ApiError(400, f"{self._in}: at most {MAX_FIELD_BYTES} bytes", param=self._in)

    def _end(self) -> None:
        self.ended = True


def _boundary(request: Request, field: str) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        what = "the file and its purpose" if field == "file" else f"the part's bytes in {field!r}"
        raise _bad_file(f"expected a multipart/form-data body with {what}", param=field)
    return boundary


async def _in_thread(function, *args):
    return await anyio.to_thread.run_sync(function, *args)


async def receive_upload(request: Request, store: LocalArtifactStore, *, max_bytes: int, tenant_id: str,
                         field: str = "file") -> Upload:
    """Stream the request's multipart body into staging: 413 past max_bytes, 400 for a bad body or name.
    `field` is the form field of the bytes ("file"; "data" for a part of /v1/uploads); the bytes are the
    tenant's, sealed for it as they stream in (LocalArtifactStore.open_staging)."""
    boundary = _boundary(request, field)
    limit = max_bytes + MULTIPART_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large(max_bytes, param=field)
    parts = _Parts(file_field=field)
    parser = MultipartParser(boundary, parts.callbacks())
    writer: StagingWriter | None = None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(max_bytes, param=field)
            try:
                parser.write(chunk)
            except MultipartParseError:
                raise _bad_file("the body is not valid multipart/form-data", param=field) from None
            if parts.error is not None:
                raise parts.error
            if parts.file_bytes > max_bytes:
                raise too_large(max_bytes, param=field)
            if parts.pending_bytes >= WRITE_BATCH:
                writer = writer or await _in_thread(lambda: store.open_staging(max_bytes=max_bytes, tenant_id=tenant_id))
                await _in_thread(writer.write, parts.take())
        if not parts.ended:
            raise _bad_file("the multipart body ends before its closing boundary", param=field)
        if parts.filename is None:
            raise _bad_file("required parameter is missing", param=field)
        writer = writer or await _in_thread(lambda: store.open_staging(max_bytes=max_bytes, tenant_id=tenant_id))
        await _in_thread(writer.write, parts.take())
        staged = await _in_thread(writer.finish)
    except UploadTooLarge:
        await _discard(writer)
        raise too_large(max_bytes, param=field) from None
    except BaseException:
        await _discard(writer)
        raise
    purpose = parts.fields.get("purpose")
    return Upload(filename=parts.filename, purpose=None if purpose is None else purpose.decode("utf-8", "replace"),
                  staged=staged, writer=writer)


async def _discard(writer: StagingWriter | None) -> None:
    if writer is not None:
        with anyio.CancelScope(shield=True):  # also when the client went away and the request is cancelled
            await _in_thread(writer.discard)
