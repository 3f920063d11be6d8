"""The blob collector: removes artifact-store blobs nothing refers to any more, and dead uploads' staging.

A blob stays while a live file row has its digest, a file row with it was deleted within the grace period,
or a job that may still run (paused included) was created on a file row with it, deleted or not, or a
part of a pending upload (/v1/uploads) has it, or a live model version or registered base model holds it
(registry_blobs: a deleted version lets go); this loop also marks uploads past their deadline expired, and
removes the decrypted inputs a dead worker left in a job directory of this home. Deleting
a file only marks its row; this loop removes the bytes, and only blobs older than the grace period, which
keeps a removal safe against an upload of the same bytes (LocalArtifactStore.remove_unreferenced).
"""

from __future__ import annotations

import logging
import threading
import time

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import uploads as upload_rows
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore, sweep_staging
from tuneforge.registry.storage.jobs import remove_inputs, stale_input_folders
from tuneforge.scheduler.loop import run_until_stopped
from tuneforge.settings import Settings
from tuneforge.spec.api import ACTIVE_STATUSES, RUNNING

log = logging.getLogger("tuneforge.scheduler.blobs")
INPUTS_MIN_AGE_S = 60.0  # a job's inputs folder written this recently may be a worker staging it right now


class BlobCollector:
    def __init__(self, db: Database, settings: Settings, store: LocalArtifactStore):
        self.db, self.settings, self.store = db, settings, store
        self._started = False

    def run_once(self) -> dict[str, int]:
        counts = {"restored": 0, "swept": 0, "removed": 0, "expired uploads": 0}
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
            return file_rows.blob_referenced(session, sha256=sha256, deleted_after=int(cutoff),
                                             active_statuses=ACTIVE_STATUSES) \
                or upload_rows.part_blob_pending(session, sha256=sha256) \
                or version_rows.blob_referenced(session, sha256=sha256)  # a model version's or base model's file

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        interval = max(0.5, min(self.settings.blob_grace_seconds / 4, 300.0))
        run_until_stopped(self.run_once, interval=interval, stop=stop)
