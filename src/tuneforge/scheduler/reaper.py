"""The reaper: re-queues jobs whose worker stopped renewing its lease (they resume from their last
checkpoint as a new attempt), lets go of expired leases on paused or cancelled jobs, and finishes the
admission of jobs left in validating_files by a crash between two transactions."""

from __future__ import annotations

import threading
import time

from tuneforge.db import jobs as job_rows
from tuneforge.db.identifiers import now
from tuneforge.db.session import Database
from tuneforge.scheduler import states
from tuneforge.scheduler.admission import admit_job
from tuneforge.scheduler.loop import run_until_stopped, stop_on_signals
from tuneforge.settings import Settings
from tuneforge.spec.api import RUNNING, VALIDATING_FILES

STUCK_VALIDATING_S = 30


class Reaper:
    def __init__(self, db: Database, settings: Settings):
        self.db, self.settings = db, settings

    def run_once(self) -> dict[str, int]:
        counts = {"requeued": 0, "failed": 0, "released": 0, "admitted": 0}
        now_s = time.time()
        with self.db.session() as session:
            for job in job_rows.expired_leases(session, now_s=now_s):
                if job.status == RUNNING:
                    outcome = states.requeue(
                        session, job_id=job.id, attempt=job.attempt, reason="its worker stopped renewing the lease",
                        max_attempts=self.settings.max_attempts, lease_expired_before=now_s,
                    )
                    if outcome:
                        counts["requeued" if outcome != "failed" else "failed"] += 1
                elif states.drop_expired_lease(session, job_id=job.id, now_s=now_s):
                    counts["released"] += 1
        with self.db.session() as session:
            for job in job_rows.jobs_in_status(session, status=VALIDATING_FILES, created_before=now() - STUCK_VALIDATING_S):
                counts["admitted"] += admit_job(session, job=job)
        return counts

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        stop_on_signals(stop)
        interval = max(0.2, min(self.settings.lease_seconds / 4, 5.0))
        run_until_stopped(self.run_once, interval=interval, stop=stop)
