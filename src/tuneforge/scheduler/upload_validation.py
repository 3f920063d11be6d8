"""The upload validator: the scheduler's loop that validates uploaded files out of the request path.

Each file is claimed (two schedulers never validate one file; a dead one's claim runs out) and validated
by a child process (`python -m tuneforge.registry.datasets`, torch-free) that this loop bounds in wall time
and resident memory, killing it past either; the child bounds its own reading (inflated bytes, compression
ratio, lines). A sealed upload is decrypted for the child into this loop's locked work folder (0700, under
the artifact folder's staging; removed when the validation ends, swept if this process dies), a plaintext
one is linked there. The file becomes processed or error, then the jobs waiting on it are admitted. A stop
(SIGTERM) kills the child and gives the claim back: the file stays uploaded, validated at the next start.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tuneforge.db import files as file_rows
from tuneforge.db.session import Database
from tuneforge.db.tables import File
from tuneforge.registry.artifacts import ContentMissing, LocalArtifactStore
from tuneforge.registry.datasets import refused_report
from tuneforge.registry.storage.envelope import DecryptionFailed
from tuneforge.registry.storage.jobs import publish_dataset
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.registry.storage.tenant_store import open_tenant_store
from tuneforge.scheduler.admission import admit_job
from tuneforge.scheduler.loop import run_until_stopped
from tuneforge.settings import Settings
from tuneforge.spec.api import VALIDATING_FILES, DatasetReport

log = logging.getLogger("tuneforge.scheduler.uploads")
POLL_S = 0.05  # how often a running validation's clock and memory are checked
CLAIM_MARGIN_S = 60.0  # a claim outlives the validation's wall-time bound by this much
MAX_STATUS_DETAILS = 2000


class Interrupted(Exception):
    """The scheduler is stopping: the validation was killed and its file is to be validated again."""


def resident_bytes(pid: int) -> int:
    """A process's resident memory from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _content_missing(file: File) -> DatasetReport:
    return refused_report(file.filename, kind="content_missing", expected="its content in the artifact store",
                          found="has no content in the artifact store")


def _size(n: float) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


class UploadValidator:
    def __init__(self, db: Database, settings: Settings, store: LocalArtifactStore, *, owner: str | None = None,
                 stop: threading.Event | None = None):
        self.db, self.settings, self.store = db, settings, store
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stop = stop or threading.Event()
        self._validated_last_pass: list[str] = []
        self.tenant_store = open_tenant_store(db, settings)  # with an object store: valid files go there too

    def run_once(self) -> int:
        """Validate every file waiting now, one at a time; returns how many were validated."""
        # A job whose creation read its file as "uploaded" just before the file was finished commits after
        # the admission that followed; one pass later it is admitted here (the reaper is the last resort).
        for file_id in self._validated_last_pass:
            self._admit_waiting(file_id)
        self._validated_last_pass = []
        validated = 0
        while not self.stop.is_set():
            now_s = time.time()
            until = now_s + self.settings.validation_timeout_seconds + CLAIM_MARGIN_S
            with self.db.session() as session:
                file = file_rows.claim_upload(session, owner=self.owner, until=until, now_s=now_s)
            if file is None:
                break
            validated += self._validate_and_record(file)
        return validated

    def run(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or self.stop
        run_until_stopped(self.run_once, interval=self.settings.poll_seconds, stop=self.stop)

    def _validate_and_record(self, file: File) -> bool:
        try:
            publish = None
            if self.tenant_store is not None:  # before "processed": no job can run ahead of its data
                def publish(plaintext: Path) -> None:
                    publish_dataset(self.tenant_store, tenant_id=file.tenant_id, file_id=file.id, blob=plaintext)
            report = self.validate(file, on_valid=publish)
        except BaseException:  # stopping (Interrupted), or a fault here: the file waits for the next try
            with self.db.session() as session:
                file_rows.release_validation(session, file_id=file.id, owner=self.owner)
            if sys.exc_info()[0] is Interrupted:
                log.info("stopped validating %s; it stays uploaded", file.id)
                return False
            raise
        status = file_rows.PROCESSED if report.valid else file_rows.ERROR
        with self.db.session() as session:
            finished = file_rows.finish_validation(
                session, file_id=file.id, owner=self.owner, status=status, report=report.model_dump(mode="json"),
                status_details=None if report.valid else report.summary[:MAX_STATUS_DETAILS],
            )
        log.info("validated %s: %s", file.id, report.summary.splitlines()[0] if report.summary else status)
        if finished:
            self._admit_waiting(file.id)
            self._validated_last_pass.append(file.id)
        return finished

    def _admit_waiting(self, file_id: str) -> None:
        with self.db.session() as session:
            for job in file_rows.jobs_waiting_on(session, file_id=file_id, status=VALIDATING_FILES):
                admit_job(session, job=job)

    def validate(self, file: File, *, on_valid=None) -> DatasetReport:
        """The file's report from a bounded child process; raises Interrupted when the scheduler stops.
        on_valid(plaintext path), when given, runs on a valid file before its plaintext is removed."""
        with self.db.read_session() as session:
            content = self.store.find_content(session, tenant_id=file.tenant_id, sha256=file.sha256, holder=file.id)
        if content is None:
            return _content_missing(file)
        folder = self.store.work_folder()
        try:
            # The child reads the bytes under the upload's name, so the name's suffix tells the file type.
            data = folder.path / "data"
            data.mkdir(mode=0o700)
            link = data / (file.filename if file.filename not in ("", ".", "..") and "/" not in file.filename
                           else "upload")
            try:
                if content.sealed:
                    self.store.write_plaintext(content, link)
                else:
                    link.symlink_to(content.path)
            except ContentMissing:
                return _content_missing(file)
            except KeyUnavailable:
                return refused_report(file.filename, kind="content_shredded",
                                      expected="content readable under its tenant's key",
                                      found="can no longer be read: the tenant's encryption key was destroyed "
                                            "(crypto-shredded)")
            except DecryptionFailed as exc:
                return refused_report(file.filename, kind="content_damaged", expected="content that authenticates",
                                      found=f"is damaged in storage ({exc})")
            output = folder.path / "report.json"
            with open(folder.path / "validate.log", "wb") as child_log:
                # No preexec_fn: this process has threads; the child ties itself to us (registry.datasets).
                child = subprocess.Popen(self._command(link, file.filename, output, file.purpose), stdin=subprocess.DEVNULL,
                                         stdout=child_log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                bound = self._watch(child)
            finally:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            if bound is not None:
                kind, expected, found = bound
                return refused_report(file.filename, kind=kind, expected=expected, found=found)
            if output.is_file():
                report = DatasetReport.model_validate_json(output.read_text())
                if report.valid and on_valid is not None:
                    on_valid(link)
                return report
            tail = (folder.path / "validate.log").read_text(errors="replace")[-2000:]
            log.error("validating %s failed (exit %s):\n%s", file.id, child.returncode, tail)
            return refused_report(file.filename, kind="validation_failed", expected="a completed validation",
                                  found=f"could not be validated (the validator exited with {child.returncode})")
        finally:
            folder.remove()

    def _command(self, link: Path, display_name: str, output: Path, purpose: str = "fine-tune") -> list[str]:
        s = self.settings
        return [sys.executable, "-m", "tuneforge.registry.datasets", str(link), f"--display-name={display_name}",
                f"--purpose={purpose}",
                f"--output={output}", f"--parent-pid={os.getpid()}", f"--max-inflated-bytes={s.validation_max_inflated_bytes}",
                f"--max-ratio={s.validation_max_ratio}", f"--ratio-floor-bytes={s.validation_ratio_floor_bytes}",
                f"--max-lines={s.validation_max_lines}"]

    def _watch(self, child: subprocess.Popen) -> tuple[str, str, str] | None:
        """Wait for the child; the (kind, expected, found) of the bound it passed, None when it finished."""
        timeout, max_memory = self.settings.validation_timeout_seconds, self.settings.validation_max_memory_bytes
        deadline = time.monotonic() + timeout
        while child.poll() is None:
            if self.stop.is_set():
                raise Interrupted
            if time.monotonic() > deadline:
                return ("validation_timeout", f"a validation of at most {timeout:g} s",
                        f"took longer than {timeout:g} s to validate")
            if resident_bytes(child.pid) > max_memory:
                return ("validation_memory", f"a validation in at most {_size(max_memory)} of memory",
                        f"needed more than {_size(max_memory)} of memory to validate")
            self.stop.wait(POLL_S)
        return None
