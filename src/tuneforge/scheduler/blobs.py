"""The blob collector: removes artifact-store blobs nothing refers to any more, and dead uploads' staging.

A blob stays while a live file row has its digest, a file row with it was deleted within the grace period,
or a job that may still run (paused included) was created on a file row with it, deleted or not. Deleting
a file only marks its row; this loop removes the bytes, and only blobs older than the grace period, which
keeps a removal safe against an upload of the same bytes (LocalArtifactStore.remove_unreferenced).
"""

from __future__ import annotations

import logging
import threading
import time

from tuneforge.db import files as file_rows
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore, sweep_staging
from tuneforge.scheduler.loop import run_until_stopped
from tuneforge.settings import Settings
from tuneforge.spec.api import ACTIVE_STATUSES

log = logging.getLogger("tuneforge.scheduler.blobs")


class BlobCollector:
    def __init__(self, db: Database, settings: Settings, store: LocalArtifactStore):
        self.db, self.settings, self.store = db, settings, store
        self._started = False

    def run_once(self) -> dict[str, int]:
        counts = {"restored": 0, "swept": 0, "removed": 0}
        if not self._started:  # at start-up: what a collector killed mid-removal left in the trash
            counts["restored"] = len(self.store.recover_trash())
            self._started = True
        swept = sweep_staging(self.store.staging_root)
        counts["swept"] = len(swept)
        cutoff = time.time() - self.settings.blob_grace_seconds
        for sha256 in list(self.store.blobs_older_than(cutoff)):
            counts["removed"] += self.store.remove_unreferenced(
                sha256, cutoff=cutoff, referenced=lambda digest=sha256: self._referenced(digest, cutoff))
        if any(counts.values()):
            log.info("blobs: %s", ", ".join(f"{n} {what}" for what, n in counts.items() if n))
        return counts

    def _referenced(self, sha256: str, cutoff: float) -> bool:
        with self.db.session() as session:
            return file_rows.blob_referenced(session, sha256=sha256, deleted_after=int(cutoff),
                                             active_statuses=ACTIVE_STATUSES)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        interval = max(0.5, min(self.settings.blob_grace_seconds / 4, 300.0))
        run_until_stopped(self.run_once, interval=interval, stop=stop)
