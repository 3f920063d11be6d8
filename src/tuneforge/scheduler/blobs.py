"""The blob collector: removes artifact-store blobs nothing refers to any more, and dead uploads' staging.

A tenant's sealed blob (artifacts/sealed/) stays while a file row of that tenant has its digest and is live,
was deleted within the grace period, or has a job that may still run (paused included), or a part of a
pending upload of that tenant (/v1/uploads) has it, or a live model version or an export of that tenant holds
it (registry_blobs); only the tenant's own rows count. A plaintext blob (artifacts/sha256/) stays for the same
references from tenants whose copy is not sealed (an install from before sealing), or while a registered base
model, or a version or export of such a tenant, holds it (registry_blobs: a deleted version lets go). This
loop also marks uploads past their deadline expired, removes the decrypted inputs a dead worker left in a job
directory of this home, and sealed blob files no row names (a process that died between writing one and
committing its row). With an object store, it also drops the links of owners gone for good (a file deleted
past the grace period that no job which may still run names, a job
whose model was deleted, a registered base model that was deleted) and removes the objects nothing links to
any more (rows, then bytes; never the object of a dataset registered where it lies: that is the tenant's own
bucket). Deleting a file only marks its row; this loop
removes the bytes, and only those nobody committed within the grace period, which keeps a removal safe
against an upload of the same bytes (LocalArtifactStore.remove_unreferenced; for sealed blobs one guarded
DELETE of the row, db/sealed_blobs.py:drop_if_untouched).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import IntegrityError

from tuneforge.db import jobs as job_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db import store_collection as store_rows
from tuneforge.db import uploads as upload_rows
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore, sweep_staging
from tuneforge.registry.storage.jobs import BASE_MODELS_TENANT, remove_inputs, stale_input_folders
from tuneforge.registry.storage.tenant_store import open_tenant_store
from tuneforge.scheduler.loop import run_until_stopped
from tuneforge.settings import Settings
from tuneforge.spec.api import ACTIVE_STATUSES, RUNNING

log = logging.getLogger("tuneforge.scheduler.blobs")
INPUTS_MIN_AGE_S = 60.0  # a job's inputs folder written this recently may be a worker staging it right now
ORPHAN_MIN_AGE_S = 600.0  # a sealed blob file without a row, this young, may be an upload committing its row now


class BlobCollector:
    def __init__(self, db: Database, settings: Settings, store: LocalArtifactStore):
        self.db, self.settings, self.store = db, settings, store
        self.tenant_store = open_tenant_store(db, settings)  # with an object store: its unlinked objects go too
        self._started = False

    def run_once(self) -> dict[str, int]:
        counts = {"restored": 0, "swept": 0, "removed": 0, "removed sealed": 0, "expired uploads": 0}
        if not self._started:  # at start-up: what a collector killed mid-removal left in the trash
            counts["restored"] = len(self.store.recover_trash())
            self._started = True
        with self.db.session() as session:  # their parts' blobs are then unreferenced, removed below once old
            counts["expired uploads"] = upload_rows.expire_uploads(session, now_s=int(time.time()))
        swept = sweep_staging(self.store.staging_root)
        counts["swept"] = len(swept)
        counts["stale job inputs"] = self._sweep_job_inputs()
        cutoff = time.time() - self.settings.blob_grace_seconds
        for sha256 in list(self.store.blobs_older_than(cutoff)):
            counts["removed"] += self.store.remove_unreferenced(
                sha256, cutoff=cutoff, referenced=lambda digest=sha256: self._referenced(digest, cutoff))
        counts["removed sealed"] = self._collect_sealed(cutoff)
        counts["sealed orphans"] = self._sweep_sealed_orphans()
        if self.tenant_store is not None:
            counts["store links dropped"], counts["store objects removed"] = self._collect_store(cutoff)
        if any(counts.values()):
            log.info("blobs: %s", ", ".join(f"{n} {what}" for what, n in counts.items() if n))
        return counts

    def _sweep_job_inputs(self) -> int:
        """Decrypted job inputs (registry/storage/jobs.py) a worker sharing this home left when it died: the
        worker removes them when a job ends, this catches the rest once the job is not running."""
        removed = 0
        for job_id, folder in stale_input_folders(self.settings.jobs_dir, min_age_s=INPUTS_MIN_AGE_S):
            with self.db.session() as session:
                job = job_rows.get_job_any_tenant(session, job_id=job_id)
            if job is None or job.status != RUNNING:
                remove_inputs(folder.parent)
                removed += 1
        return removed

    def _referenced(self, sha256: str, cutoff: float) -> bool:
        with self.db.session() as session:
            return blob_rows.plaintext_blob_referenced(session, sha256=sha256, deleted_after=int(cutoff),
                                                       active_statuses=ACTIVE_STATUSES) \
                or blob_rows.plaintext_registry_referenced(session, sha256=sha256)  # a base model's, unsealed version's

    def _collect_sealed(self, cutoff: float) -> int:
        """Remove the sealed blobs nothing of their tenant refers to and nobody committed since cutoff: the
        check and the row's guarded DELETE in one transaction, then the file."""
        removed, after = 0, 0
        while True:
            with self.db.read_session() as session:
                batch = [(row.seq, row.id, row.tenant_id, row.sha256)
                         for row in blob_rows.blobs_untouched_since(session, cutoff=int(cutoff), after_seq=after)]
            if not batch:
                return removed
            after = batch[-1][0]
            for _, blob_id, tenant_id, sha256 in batch:
                with self.db.session() as session:
                    if blob_rows.sealed_blob_referenced(session, tenant_id=tenant_id, sha256=sha256,
                                                        deleted_after=int(cutoff), active_statuses=ACTIVE_STATUSES):
                        continue
                    if not blob_rows.drop_if_untouched(session, blob_id=blob_id, cutoff=int(cutoff)):
                        continue
                self.store.sealed_path(tenant_id, blob_id).unlink(missing_ok=True)
                removed += 1

    def _collect_store(self, cutoff: float) -> tuple[int, int]:
        """Drop the links of owners gone for good, then remove the objects no link names: each row by one
        guarded DELETE (a writer linking the object at that moment keeps it), then its bytes."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self.db.session() as session:
            dead = store_rows.dead_link_owners(session, cutoff=int(cutoff), active_statuses=ACTIVE_STATUSES)
            dead += store_rows.dead_base_model_owners(session, tenant_id=BASE_MODELS_TENANT, cutoff=int(cutoff))
            dropped = sum(store_rows.drop_links(session, owner=owner) for owner in dead)
        removed = 0
        while True:
            with self.db.read_session() as session:
                batch = [(obj.id, obj.location) for obj in store_rows.unlinked_objects(session, cutoff=int(cutoff))]
            progress = False
            for object_id, location in batch:
                try:
                    with self.db.session() as session:
                        if not store_rows.drop_unlinked_object(session, object_id=object_id):
                            continue
                except IntegrityError:
                    continue  # linked at this very moment (a dedupe onto it): it stays
                progress = True
                if location.startswith("s3://"):
                    continue  # a dataset registered where it lies: the tenant's own object, only forgotten here
                try:
                    self.tenant_store.backend.delete(location)
                    removed += 1
                except (BotoCoreError, ClientError, OSError) as exc:  # no row names it: nothing can read it again
                    log.warning("could not remove object %s from the store (%s); nothing refers to it", object_id, exc)
            if not progress:
                return dropped, removed

    def _sweep_sealed_orphans(self) -> int:
        """Sealed blob files no row names, older than ORPHAN_MIN_AGE_S (or the grace period, if longer)."""
        cutoff = time.time() - max(self.settings.blob_grace_seconds, ORPHAN_MIN_AGE_S)
        files = list(self.store.sealed_blob_files())
        removed = 0
        for start in range(0, len(files), 500):
            batch = files[start:start + 500]
            with self.db.read_session() as session:
                known = blob_rows.known_blob_ids(session, blob_ids=[blob_id for _, blob_id, _ in batch])
            for _, blob_id, path in batch:
                try:
                    if blob_id not in known and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        interval = max(0.5, min(self.settings.blob_grace_seconds / 4, 300.0))
        run_until_stopped(self.run_once, interval=interval, stop=stop)
