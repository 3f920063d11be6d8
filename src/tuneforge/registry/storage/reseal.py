"""Sealing the plaintext blobs of an install from before sealing (`tuneforge storage seal-artifacts`).

Each tenant's copy of each plaintext blob (artifacts/sha256/) that a file row, a pending upload part, or a file
of one of the tenant's model versions or exports (registry_blobs) names becomes a sealed blob of that tenant; the
plaintext blob is then removed unless something still needs it (a registered base model with the same bytes, a
job running on it right now: the blob collector removes it once that has ended). Then the plaintext copies of the
tenants' versions materialized under TUNEFORGE_HOME/registry/ (the shared cache readers used before sealing) go.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db.tables import Job, ModelVersion
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import CHUNK, LocalArtifactStore
from tuneforge.spec.api import ACTIVE_STATUSES, RUNNING


class DamagedBlob(ValueError):
    """A plaintext blob whose bytes no longer hash to its name: left as it is, never sealed."""


@dataclass
class ResealReport:
    sealed: int = 0  # tenant copies sealed
    missing: int = 0  # named by a row, absent from this artifact folder
    plaintext_removed: int = 0
    plaintext_kept: int = 0  # still needed (a base model, a running job): the collector removes it later
    copies_removed: int = 0  # plaintext materialized copies of sealed versions under TUNEFORGE_HOME/registry
    copies_kept: int = 0  # left while a job runs (it may be reading one); the next seal-artifacts removes them


def seal_plaintext_uploads(db: Database, store: LocalArtifactStore, *, tenant_id: str | None = None,
                           registry_root: Path | None = None) -> ResealReport:
    """Seal what is plaintext (uploads and the registry's files), then remove the plaintext blobs nothing needs
    and, with registry_root (TUNEFORGE_HOME/registry), the materialized copies of versions now sealed."""
    if not store.seal:
        raise ValueError("sealing is off (TUNEFORGE_ENCRYPT_AT_REST=false): there is nothing to seal with")
    report, done = ResealReport(), set()
    with db.read_session() as session:
        todo = sorted(set(blob_rows.unsealed_contents(session, tenant_id=tenant_id))
                      | set(blob_rows.unsealed_registry_contents(session, tenant_id=tenant_id)))
    for tenant, sha256 in todo:
        if not store.exists(sha256):
            report.missing += 1
            continue
        writer = store.open_staging(max_bytes=1 << 62, tenant_id=tenant)
        try:
            with store.open(sha256) as source:
                while block := source.read(CHUNK):
                    writer.write(block)
            staged = writer.finish()
            if staged.sha256 != sha256:
                raise DamagedBlob(f"the plaintext blob {sha256} does not hash to its name (damaged); it was left as it is")
            with db.session() as session:
                store.commit(staged, session=session)
        finally:
            writer.discard()
        report.sealed += 1
        done.add(sha256)
    for sha256 in sorted(done):
        def referenced(digest: str = sha256) -> bool:
            with db.session() as session:
                return blob_rows.plaintext_blob_referenced(session, sha256=digest, deleted_after=int(time.time()),
                                                           active_statuses=ACTIVE_STATUSES) \
                    or blob_rows.plaintext_registry_referenced(session, sha256=digest)

        if store.remove_unreferenced(sha256, cutoff=time.time() + 1, referenced=referenced):
            report.plaintext_removed += 1
        else:
            report.plaintext_kept += 1
    if registry_root is not None:
        _remove_materialized_copies(db, registry_root, tenant_id=tenant_id, report=report)
    return report


def _remove_materialized_copies(db: Database, registry_root: Path, *, tenant_id: str | None,
                                report: ResealReport) -> None:
    """The shared cache's folders (ROOT/<manifest digest>[-on-...]) of versions whose every file is now sealed for
    their tenant; all of them kept while any job runs (its recipe may be reading one of them)."""
    with db.read_session() as session:
        running = session.scalar(select(Job.id).where(Job.status == RUNNING).limit(1)) is not None
        query = select(ModelVersion)
        if tenant_id is not None:
            query = query.where(ModelVersion.tenant_id == tenant_id)
        sealed = {row.manifest_sha256 for row in session.scalars(query)
                  if all(blob_rows.find_blob(session, tenant_id=row.tenant_id, sha256=entry["sha256"]) is not None
                         for entry in row.manifest["files"])}
    for folder in sorted(registry_root.iterdir()) if registry_root.is_dir() else []:
        if folder.is_symlink() or not folder.is_dir() or folder.name.split("-on-")[0] not in sealed:
            continue
        if running:
            report.copies_kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
        report.copies_removed += 1
