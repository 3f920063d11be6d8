"""Datasets registered where they lie: an admin names an s3:// object, and it becomes a tenant's file
without a copy in the artifact folder or the store.

An operator's action only (`tuneforge storage register-dataset`); no API request can name a location.
The object is read once, into a locked scratch folder, to hash and validate it like an upload, then the
scratch copy goes. Jobs on the file fetch it from its own bucket. It is not encrypted by tuneforge (it is
the tenant's own bucket, under its own policy), and GET /v1/files/{id}/content answers 404 for it.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.db import files as file_rows
from tuneforge.db import keys as key_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.identifiers import new_id
from tuneforge.db.tables import File
from tuneforge.registry.datasets import inspect_dataset, inspect_eval_items
from tuneforge.registry.storage.backends import ObjectMissing, check_key
from tuneforge.registry.storage.jobs import DATASET_LINK
from tuneforge.registry.storage.tenant_store import TenantStore, file_sha256, tenant_address


class NotRegistrable(ValueError):
    """A URI that cannot become a dataset: its scheme, its name, or its content."""


def register_dataset_uri(store: TenantStore, *, tenant_id: str, uri: str, purpose: str = "fine-tune") -> File:
    """A processed (or, when invalid, error) file of the tenant whose bytes stay at the s3:// URI."""
    if not uri.startswith("s3://") or "/" not in uri.removeprefix("s3://").strip("/"):
        raise NotRegistrable(f"{uri}: expected s3://bucket/key")
    backend, key = store.locate(uri)
    try:
        check_key(key)
    except ValueError:
        raise NotRegistrable(f"{uri}: the key names no file") from None
    filename = Path(key).name
    folder = store.scratch.work_folder()
    try:
        local = folder.path / filename  # under its own name: the suffix tells the file type
        try:
            backend.download(key, local)
        except ObjectMissing:
            raise NotRegistrable(f"{uri}: no such object") from None
        sha256 = file_sha256(local)
        report = (inspect_eval_items if purpose == "evals" else inspect_dataset)(local, display_name=filename)
        size = local.stat().st_size
    finally:
        folder.remove()
    address = tenant_address(tenant_id, f"{sha256}@{uri}")
    with store.db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=tenant_id)
        row = file_rows.create_file(session, tenant_id=tenant_id, filename=filename, purpose=purpose, size=size,
                                    sha256=sha256, report=report.model_dump(mode="json"),
                                    status=file_rows.PROCESSED if report.valid else file_rows.ERROR,
                                    status_details=None if report.valid else report.summary[:2000])
        obj = key_rows.find_object(session, tenant_id=tenant_id, address=address) or key_rows.add_object(
            session, object_id=new_id(key_rows.OBJECT), tenant_id=tenant_id, address=address, location=uri, size=size,
            encrypted=False, key_version=None, wrapped_key=None)
        key_rows.link_object(session, owner=row.id, name=DATASET_LINK, tenant_id=tenant_id, kind="dataset",
                             object_id=obj.id)
        return row
