"""Datasets as registry artifacts: a processed upload registered as the next version of a name (deduplicated
by content against the name's newest version), references a job takes in place of a file id
(dataset:NAME@vN, dataset:NAME:ALIAS, pinned to the file at submission), the deletion rules, and what a
model's lineage records of the dataset versions it was trained on.

A version holds a file; it never copies or removes the bytes (the file keeps its own lifecycle, and cannot
be deleted while a live version holds it).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.db import dataset_versions as dataset_rows
from tuneforge.db import files as file_rows
from tuneforge.db.tables import DatasetVersion, File, Job
from tuneforge.spec.api import ACTIVE_STATUSES
from tuneforge.spec.datasets import DATASET_REFERENCE

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
VERSION_NUMBER = re.compile(r"v?([0-9]{1,9})")
ROLES = ("training", "validation")


class DatasetError(LookupError):
    """A dataset request the registry refuses; status is the HTTP status it maps to."""

    def __init__(self, message: str, *, status: int = 404, code: str = "dataset_not_found", field: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.field = message, status, code, field


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise DatasetError(f"dataset name {name!r}: expected lowercase letters, digits and '-', starting with a "
                           "letter or digit, at most 64 characters (e.g. support-chats)", status=400,
                           code="invalid_value")


def register_file(session: Session, *, file: File, name: str,
                  source_version: DatasetVersion | None = None) -> tuple[DatasetVersion, bool]:
    """(version, created): the next version of name holding file, or the name's newest version when it
    already has the file's content (created False). The file must be processed (validated, no problems)."""
    check_name(name)
    if file.status != file_rows.PROCESSED:
        state = "is still being validated" if file.status == file_rows.UPLOADED else "failed validation"
        raise DatasetError(f"file {file.id} {state} (status {file.status!r}); only a processed file can be a dataset "
                           "version (GET /v1/files/{file_id}/validation shows its report)", status=400,
                           code="file_not_processed")
    newest = dataset_rows.newest_version(session, tenant_id=file.tenant_id, name=name)
    if newest is not None and newest.sha256 == file.sha256:
        return newest, False
    return dataset_rows.create_version(session, file=file, name=name,
                                       source_version_id=source_version.id if source_version else None), True


def find_version(session: Session, *, tenant_id: str, name: str, ref: str) -> DatasetVersion:
    """A live version of name by number (v2, 2), id (dsv_...) or alias."""
    if ref.startswith(dataset_rows.VERSION):
        version = dataset_rows.version_by_id(session, tenant_id=tenant_id, version_id=ref)
        version = version if version is not None and version.name == name else None
    elif match := VERSION_NUMBER.fullmatch(ref):
        version = dataset_rows.get_version(session, tenant_id=tenant_id, name=name, version=int(match.group(1)))
    else:
        version = dataset_rows.alias_target(session, tenant_id=tenant_id, name=name, alias=ref)
    if version is None:
        raise DatasetError(f"dataset {name!r} has no version or alias {ref!r}")
    return version


def find_reference(session: Session, *, tenant_id: str, ref: str) -> DatasetVersion:
    """A version by NAME@vN, NAME:ALIAS, its id dsv_..., or NAME (its newest version)."""
    if ref.startswith(dataset_rows.VERSION):
        version = dataset_rows.version_by_id(session, tenant_id=tenant_id, version_id=ref)
        if version is None:
            raise DatasetError(f"no dataset version with id {ref!r}")
        return version
    name, sep, rest = ref.partition("@") if "@" in ref else ref.partition(":")
    if sep:
        return find_version(session, tenant_id=tenant_id, name=name, ref=rest)
    newest = dataset_rows.newest_version(session, tenant_id=tenant_id, name=name)
    if newest is None:
        raise DatasetError(f"no dataset named {name!r}")
    return newest


def is_reference(value: str | None) -> bool:
    return bool(value) and value.startswith(DATASET_REFERENCE)


def resolve_file_reference(session: Session, *, tenant_id: str, ref: str) -> DatasetVersion:
    """What a job's training_file / validation_file of the form dataset:NAME@vN or dataset:NAME:ALIAS names
    now; the caller pins the version's file id. Another tenant's dataset answers like a missing one."""
    body = ref.removeprefix(DATASET_REFERENCE)
    name, sep, rest = body.partition("@") if "@" in body else body.partition(":")
    if not sep or not rest or not NAME.fullmatch(name) or (sep == "@" and not VERSION_NUMBER.fullmatch(rest)):
        raise DatasetError(f"{ref!r}: expected a file id, dataset:NAME@vN or dataset:NAME:ALIAS", status=400,
                           code="invalid_value")
    return find_version(session, tenant_id=tenant_id, name=name, ref=rest)


def pin_references(session: Session, *, tenant_id: str, fields: dict[str, str | None]) -> dict[str, DatasetVersion]:
    """field -> the version each dataset:NAME@vN / dataset:NAME:ALIAS among fields names now (file ids and empty
    fields are left out): the caller pins its file id, so a moved alias never changes what was created. A
    reference that names nothing raises DatasetError with the field's name in front of its message and in .field."""
    pinned = {}
    for field, ref in fields.items():
        if not is_reference(ref):
            continue
        try:
            pinned[field] = resolve_file_reference(session, tenant_id=tenant_id, ref=ref)
        except DatasetError as exc:
            raise DatasetError(f"{field}: {exc.message}", status=exc.status, code=exc.code, field=field) from None
    return pinned


def delete_version(session: Session, *, version: DatasetVersion) -> None:
    """Delete the version (never its file); refused while an alias or a job not finished yet uses it."""
    blockers = dataset_rows.deletion_blockers(session, version=version, active_statuses=ACTIVE_STATUSES)
    if blockers:
        raise DatasetError(f"dataset {version.name} v{version.version} cannot be deleted: {'; '.join(blockers)}",
                           status=409, code="dataset_in_use")
    dataset_rows.delete_version(session, version=version)


def file_blockers(session: Session, *, file: File) -> list[str]:
    """Why the file cannot be deleted as far as the dataset registry is concerned: the live versions holding it
    (checked with the file's row locked, so no registration of it passes at the same time)."""
    dataset_rows.lock_live_file(session, tenant_id=file.tenant_id, file_id=file.id)
    return [f"dataset {row.name} v{row.version} holds it" for row in
            dataset_rows.live_versions_of_file(session, tenant_id=file.tenant_id, file_id=file.id)]


def lineage_dataset(session: Session, *, job: Job, role: str, file_id: str) -> dict[str, Any]:
    """{"dataset", "version"} of the registered version the job trained on as role, or {}: the one the job
    named when it was created, else the newest version holding the file when the job was created."""
    version = dataset_rows.job_dataset(session, job=job, role=role)
    if version is None or version.file_id != file_id:
        version = dataset_rows.version_holding_file(session, tenant_id=job.tenant_id, file_id=file_id,
                                                    at=job.created_at)
    return {"dataset": version.name, "version": version.version} if version is not None else {}
