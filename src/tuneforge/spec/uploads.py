"""Request and response shapes of OpenAI's Uploads API (/v1/uploads): a large file sent in parts, then
completed into an ordinary File. Field names are OpenAI's, so the official `openai` client parses them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tuneforge.spec.api import FileObject, FilePurpose, Request, Response

UploadStatus = Literal["pending", "completed", "cancelled", "expired"]
# What a dataset upload may declare itself as: JSON Lines, plain or gzip-compressed (the validator reads both).
UPLOAD_MIME_TYPES = ("application/jsonl", "application/x-ndjson", "application/json", "text/jsonl", "text/plain",
                     "application/gzip", "application/x-gzip")
PART_MAX_BYTES = 64 << 20  # OpenAI's bound on one part
MAX_PARTS = 10_000  # S3's bound on the parts of one multipart upload


class UploadCreate(Request):
    bytes: int = Field(..., ge=1, description="The file's size; the parts must add up to exactly this.")
    filename: str = Field(..., min_length=1, max_length=255, description="The name the File will have.")
    mime_type: str = Field(..., max_length=127, description=f"The file's type: one of {', '.join(UPLOAD_MIME_TYPES)}.")
    purpose: FilePurpose = Field(..., description="The File's purpose.")
    # The openai client sends expires_after (the *File's* expiry) only when asked; tuneforge files do not
    # expire, so it is refused rather than accepted and ignored.
    expires_after: dict | None = Field(None, description="Not supported: tuneforge files live until deleted.")


class UploadComplete(Request):
    part_ids: Annotated[list[str], Field(min_length=1, max_length=MAX_PARTS)] = Field(
        ..., description="The parts in the order their bytes make the file.")
    md5: str | None = Field(None, max_length=64, description="The file's MD5 (hex); a mismatch refuses the completion.")


class UploadPartObject(Response):
    object: Literal["upload.part"] = "upload.part"
    id: str
    created_at: int
    upload_id: str


class UploadObject(Response):
    object: Literal["upload"] = "upload"
    id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: FilePurpose
    status: UploadStatus
    file: FileObject | None = None
