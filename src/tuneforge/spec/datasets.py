"""Request and response schemas of the dataset registry (/v1/registry/datasets): named, immutable versions
of uploaded files, their aliases and tags."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.spec.api import Request, Response

DATASET_REFERENCE = "dataset:"  # dataset:NAME@vN or dataset:NAME:ALIAS where a job takes a file id


class DatasetVersionCreate(Request):
    file_id: str = Field(max_length=64, description="A processed file of the caller's (GET /v1/files lists them).")
    source_version: str | None = Field(
        None, max_length=160,
        description="The dataset version this one was derived from (NAME@vN, NAME:ALIAS or its id dsv_...), "
        "when the caller says so; recorded as its id, like the rest of the version, immutable.")


class DatasetVersionObject(Response):
    """One immutable version of a dataset name: the file it holds, with the digest, size and report facts the
    file had when it was registered."""

    object: Literal["dataset.version"] = "dataset.version"
    id: str
    name: str
    version: str  # v1, v2, ...
    file_id: str = Field(description="The file it holds; a job takes it, or dataset:NAME@vN, as training_file.")
    filename: str
    purpose: str
    sha256: str
    bytes: int
    format: str | None = Field(None, description="The dataset report's format (chat, instruction, ...).")
    examples: int = Field(description="The dataset report's example count.")
    created_at: int
    source_version: dict[str, Any] | None = Field(
        None, description="The version it was derived from: {id, name, version}.")
    aliases: list[str]
    tags: dict[str, str]


class RegisteredDatasetObject(Response):
    object: Literal["registered_dataset"] = "registered_dataset"
    id: str  # the name
    latest_version: str
    versions: int
    created_at: int
    aliases: dict[str, str]  # alias -> version


class DatasetDeleted(Response):
    object: Literal["dataset.version", "dataset.alias", "dataset.tag"]
    id: str
    deleted: bool = True
