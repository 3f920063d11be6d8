"""Sealing the plaintext blobs of an install from before sealing (`tuneforge storage seal-artifacts`).

Each tenant's copy of each plaintext blob (artifacts/sha256/) that a file row, a pending upload part, or a file
of one of the tenant's model versions or exports (registry_blobs) names becomes a sealed blob of that tenant; the
plaintext blob is then removed unless something still needs it (a registered base model with the same bytes, a
job running on it right now: the blob collector removes it once that has ended). Then the plaintext copies of the
tenants' versions materialized under TUNEFORGE_HOME/registry/ (the shared cache readers used before sealing) go.
The directories of jobs that ended before sealing existed are sealed as the worker seals them when a run ends
(seal_ended_job_dirs), with their human evaluation; a job that may still run is left to its worker.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db.tables import Job, ModelVersion
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import CHUNK, LocalArtifactStore
from tuneforge.registry.storage import job_files
from tuneforge.registry.storage.keys import KeyProvider, KeyUnavailable
from tuneforge.spec.api import ACTIVE_STATUSES, RUNNING, TERMINAL_STATUSES

ENDED_JOB_PARTS = job_files.SEALED_PARTS + (job_files.HUMAN_EVAL_DIR,)
STALE_STAGING_SECONDS = 3600  # a human-eval request's staging older than this was left by a process that died


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


@dataclass
class JobDirsReport:
    jobs_sealed: int = 0  # ended jobs whose plaintext parts were sealed
    files: int = 0
    bytes: int = 0  # plaintext bytes sealed
    already_sealed: int = 0  # ended jobs with nothing plaintext left
    leftovers_removed: int = 0  # half-written files of a dead process (.partial, stale staging)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (job id, why): may still run, or its key is gone


def seal_ended_job_dirs(db: Database, keys: KeyProvider, jobs_dir: Path, *,
                        tenant_id: str | None = None) -> JobDirsReport:
    """Seal the plaintext parts (job_files.SEALED_PARTS and the human evaluation) of every job that has ended,
    as the worker seals them (the job's data key, NAME -> NAME.tfe); idempotent, and a directory a crash left
    half-sealed is completed. A job that may still run (validating_files, queued, running, paused) is skipped:
    its worker seals it when its run ends."""
    report = JobDirsReport()
    with db.read_session() as session:
        query = select(Job.id, Job.tenant_id, Job.status).order_by(Job.seq)
        if tenant_id is not None:
            query = query.where(Job.tenant_id == tenant_id)
        jobs = list(session.execute(query))
    for job_id, tenant, status in jobs:
        job_dir = jobs_dir / job_id
        if not job_dir.is_dir():
            continue
        plaintext = job_files.plaintext_files(job_dir, ENDED_JOB_PARTS)
        if status not in TERMINAL_STATUSES:
            if plaintext:
                report.skipped.append((job_id, f"{status}: it may still run; its worker seals it when the run ends"))
            continue
        report.leftovers_removed += _remove_leftovers(job_dir)
        if not plaintext:
            report.already_sealed += 1
            continue
        try:
            sealed = job_files.seal_job_dir(db, keys, tenant_id=tenant, job_id=job_id, job_dir=job_dir)
            with db.session() as session:
                key = job_files.job_key_or_shredded(session, keys, tenant_id=tenant, job_id=job_id, create=True)
            judged = job_files.seal_human_eval(key, job_dir)
        except (job_files.SealedFileRefused, KeyUnavailable) as exc:  # a destroyed tenant key; another tenant's key row
            report.skipped.append((job_id, f"{status}: {exc}"))
            continue
        report.jobs_sealed += 1
        report.files += sealed.files + judged.files
        report.bytes += sealed.bytes + judged.bytes
    return report


def _remove_leftovers(job_dir: Path) -> int:
    """What a process that died left in an ended job's directory: NAME.partial (a sealed copy being written, or a
    resume's decrypted one: plaintext) and a human-eval request's staging (a directory or a dot file)."""
    removed, stale = 0, time.time() - STALE_STAGING_SECONDS
    for part in ENDED_JOB_PARTS:
        top = job_dir / part
        for path in sorted(top.rglob("*")) if top.is_dir() else [top.with_name(top.name + job_files.PARTIAL_SUFFIX),
                                                                  top.with_name(top.name + job_files.SEALED_SUFFIX
                                                                                + job_files.PARTIAL_SUFFIX)]:
            if path.is_file() and not path.is_symlink() and path.name.endswith(job_files.PARTIAL_SUFFIX):
                path.unlink()
                removed += 1
    human_eval = job_dir / job_files.HUMAN_EVAL_DIR
    staging = [p for p in job_dir.glob(f".{job_files.HUMAN_EVAL_DIR}.tmp-*") if p.is_dir() and not p.is_symlink()]
    staging += [p for p in human_eval.glob(".*.tmp-*") if p.is_file() and not p.is_symlink()] \
        if human_eval.is_dir() else []
    for path in staging:
        if path.lstat().st_mtime < stale:  # a younger one may be a request still writing it
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
    return removed
