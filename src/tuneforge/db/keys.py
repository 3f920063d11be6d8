"""Data access for storage: tenant key versions, stored objects (with their wrapped data keys) and links."""

from __future__ import annotations

import hashlib

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.tables import ObjectLink, StoredObject, TenantKey

OBJECT = "obj_"


def add_key_version(session: Session, *, tenant_id: str, version: int) -> TenantKey:
    row = TenantKey(tenant_id=tenant_id, version=version, created_at=now())
    session.add(row)
    session.flush()
    return row


def current_key_version(session: Session, *, tenant_id: str) -> int | None:
    """The newest live version: what new data keys are wrapped under."""
    return session.scalar(select(TenantKey.version).where(TenantKey.tenant_id == tenant_id, TenantKey.retired_at.is_(None))
                          .order_by(TenantKey.version.desc()).limit(1))


def highest_key_version(session: Session, *, tenant_id: str) -> int:
    """The highest version ever recorded for the tenant, retired ones included (0: none)."""
    return session.scalar(select(func.max(TenantKey.version)).where(TenantKey.tenant_id == tenant_id)) or 0


def live_key_versions(session: Session, *, tenant_id: str) -> list[int]:
    return list(session.scalars(select(TenantKey.version).where(TenantKey.tenant_id == tenant_id,
                                                                TenantKey.retired_at.is_(None)).order_by(TenantKey.version)))


def retire_key_versions(session: Session, *, tenant_id: str, versions: list[int]) -> None:
    if versions:
        session.execute(update(TenantKey).where(TenantKey.tenant_id == tenant_id, TenantKey.version.in_(versions),
                                                TenantKey.retired_at.is_(None)).values(retired_at=now()))


def drop_object(session: Session, *, obj: StoredObject) -> None:
    """Forget an object whose bytes are gone from the store (its links go with it)."""
    session.execute(delete(ObjectLink).where(ObjectLink.object_id == obj.id))
    session.delete(obj)
    session.flush()


def set_aside_object(session: Session, *, obj: StoredObject) -> None:
    """Take an object whose tenant key was shredded off its content's address, links and all: the same
    content stored again becomes a new object under the new key, and what linked the old one (owners that
    had it when the key was shredded) keeps pointing at ciphertext nobody can open, never at the new bytes.
    Its new address is a digest of its own id, which no content's address can be (a tenant_address is a digest
    of a tenant and a content digest); the collector removes it once nothing links to it."""
    obj.address = hashlib.sha256(f"tuneforge-shredded-object\x00{obj.id}".encode()).hexdigest()
    session.flush()


def find_object(session: Session, *, tenant_id: str, address: str) -> StoredObject | None:
    return session.scalar(select(StoredObject).where(StoredObject.tenant_id == tenant_id, StoredObject.address == address))


def add_object(session: Session, *, object_id: str, tenant_id: str, address: str, location: str, size: int,
               encrypted: bool, key_version: int | None, wrapped_key: str | None) -> StoredObject:
    row = StoredObject(id=object_id, tenant_id=tenant_id, address=address, location=location, bytes=size,
                       encrypted=encrypted, key_version=key_version, wrapped_key=wrapped_key, created_at=now())
    session.add(row)
    session.flush()
    return row


def objects_wrapped_under_older(session: Session, *, tenant_id: str, version: int, among: list[int] | None = None,
                                limit: int = 500) -> list[StoredObject]:
    """The tenant's encrypted objects whose data key is still wrapped under a version before `version` (of
    `among` when given: the versions that still exist; one shredded stays as it is)."""
    scope = [StoredObject.tenant_id == tenant_id, StoredObject.encrypted.is_(True), StoredObject.key_version < version]
    if among is not None:
        scope.append(StoredObject.key_version.in_(among))
    return list(session.scalars(select(StoredObject).where(*scope).order_by(StoredObject.seq).limit(limit)))


def rewrap_object(session: Session, *, object_id: str, old_version: int, version: int, wrapped_key: str) -> bool:
    """Swap in a data key re-wrapped under `version`, if nobody did it meanwhile."""
    result = session.execute(update(StoredObject).where(StoredObject.id == object_id, StoredObject.key_version == old_version)
                             .values(key_version=version, wrapped_key=wrapped_key))
    return result.rowcount == 1


def link_object(session: Session, *, owner: str, name: str, tenant_id: str, kind: str, object_id: str) -> None:
    """Point owner/name at an object (again: a re-published output replaces the old link)."""
    row = session.get(ObjectLink, (owner, name))
    if row is None:
        session.add(ObjectLink(owner=owner, name=name, tenant_id=tenant_id, kind=kind, object_id=object_id, created_at=now()))
    elif row.tenant_id == tenant_id:  # linked again now: the collector's grace period counts from here
        row.kind, row.object_id, row.created_at = kind, object_id, now()
    else:
        raise ValueError(f"{owner} belongs to another tenant")
    session.flush()


def linked_objects(session: Session, *, tenant_id: str, owner: str) -> dict[str, tuple[str, StoredObject]]:
    """name -> (kind, object) of what the tenant's owner (a file id, a job id) has in the store."""
    rows = session.execute(select(ObjectLink.name, ObjectLink.kind, StoredObject).join(
        StoredObject, StoredObject.id == ObjectLink.object_id).where(
        ObjectLink.owner == owner, ObjectLink.tenant_id == tenant_id, StoredObject.tenant_id == tenant_id))
    return {name: (kind, obj) for name, kind, obj in rows}
