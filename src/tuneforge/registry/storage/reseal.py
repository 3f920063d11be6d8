"""Sealing the plaintext uploads of an install from before sealing (`tuneforge storage seal-artifacts`).

Each tenant's copy of each plaintext upload blob (artifacts/sha256/) that a file row or a pending upload
part names becomes a sealed blob of that tenant; the plaintext blob is then removed unless something
still needs it (a model version with the same bytes, a job running on it right now: the blob collector
removes it once that has ended).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tuneforge.db import model_versions as version_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import CHUNK, LocalArtifactStore
from tuneforge.spec.api import ACTIVE_STATUSES


class DamagedBlob(ValueError):
    """A plaintext blob whose bytes no longer hash to its name: left as it is, never sealed."""


@dataclass
class ResealReport:
    sealed: int = 0  # tenant copies sealed
    missing: int = 0  # named by a row, absent from this artifact folder
    plaintext_removed: int = 0
    plaintext_kept: int = 0  # still needed (a model version, a running job): the collector removes it later


def seal_plaintext_uploads(db: Database, store: LocalArtifactStore, *, tenant_id: str | None = None) -> ResealReport:
    if not store.seal:
        raise ValueError("sealing is off (TUNEFORGE_ENCRYPT_AT_REST=false): there is nothing to seal with")
    report, done = ResealReport(), set()
    with db.read_session() as session:
        todo = blob_rows.unsealed_contents(session, tenant_id=tenant_id)
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
                    or version_rows.blob_referenced(session, sha256=digest)

        if store.remove_unreferenced(sha256, cutoff=time.time() + 1, referenced=referenced):
            report.plaintext_removed += 1
        else:
            report.plaintext_kept += 1
    return report
