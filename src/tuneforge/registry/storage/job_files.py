"""A job directory's outputs sealed at rest once its run ends: checkpoints, the adapter or full model, the
evaluation report (its samples quote the data and the model's answers) and exports.

Each file DIR/PART/NAME becomes DIR/PART/NAME.tfe: the envelope's chunked AES-GCM (envelope.py) under a key
of its own, derived (HKDF-SHA256) from the job's data key and the file's path, and bound to tenant, job and
path, so a sealed file renamed, moved to another job or changed by one bit does not authenticate. The job's
data key is wrapped under the tenant key (sealed_job_keys): rotation re-wraps it, shredding makes every file
unreadable. The worker seals when the recipe's run ends (whatever the outcome) and, before it launches a run
that resumes, unseals the checkpoints back in place: a running recipe reads plain files (exact resume is the
runtime's, unchanged), and nothing it wrote stays plaintext once it is not running. Readers in the server
(the evaluation report, an export's files) go through open_job_file, which decrypts as it reads. The human
evaluation (DIR/human_eval/, made by API requests after the run ended) is written sealed by those requests,
through seal_bytes with the same keys (evaluation/human_store.py).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.orm import Session

from tuneforge.db import sealed_blobs as key_rows
from tuneforge.db.session import Database
from tuneforge.registry.storage.envelope import DecryptionFailed, SealedReader, encrypt_stream, new_data_key
from tuneforge.registry.storage.keys import KeyProvider, KeyUnavailable
from tuneforge.registry.storage.tenant_keys import job_key_context, unwrap, version_for_writing, wrap
from tuneforge.spec.evals import OUTPUT_ITEMS_FILE
from tuneforge.spec.jobdir import ADAPTER_DIR, CHECKPOINTS_DIR, EXPORT_DIR, MODEL_DIR, REPORT_FILE

SEALED_SUFFIX = ".tfe"
PARTIAL_SUFFIX = ".partial"
# An eval run's output items (the model's answers) are read into the database when it succeeds, then sealed too.
SEALED_PARTS = (CHECKPOINTS_DIR, ADAPTER_DIR, MODEL_DIR, REPORT_FILE, EXPORT_DIR, OUTPUT_ITEMS_FILE)
RESUME_PARTS = (CHECKPOINTS_DIR,)  # what a run that resumes reads of its own directory
# The job's human evaluation (evaluation/human_store.py): API requests write it sealed after the run ended, and
# `tuneforge storage seal-artifacts` seals an older plaintext one. Its dot files (the lock, staging) hold no data.
HUMAN_EVAL_DIR = "human_eval"
HUMAN_EVAL_LOCK = ".lock"  # the lock human_store's judgement uploads take (the same file: test_sealed_human_eval.py)
CHECKPOINT_STAGING = ".staging-"  # engine/checkpoint.py STAGING_PREFIX: a save a dead run never finished


class SealedFileRefused(ValueError):
    """A sealed job file that cannot be opened: it does not authenticate (changed on disk), or its key is gone."""


class JobKeyShredded(SealedFileRefused):
    """The tenant key that wrapped the job's data key was destroyed (crypto-shredded): its files are unreadable."""


def file_context(tenant_id: str, job_id: str, relative: str) -> bytes:
    return f"tuneforge-jobfile/{tenant_id}/{job_id}/{relative}".encode()


@dataclass(frozen=True)
class JobKey:
    """A job's data key, unwrapped (memory only), and what each of its files' keys and contexts derive from."""

    tenant_id: str
    job_id: str
    key: bytes

    def file_key(self, relative: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=f"tuneforge-jobfile-key/{relative}".encode()).derive(self.key)

    def context(self, relative: str) -> bytes:
        return file_context(self.tenant_id, self.job_id, relative)

    # What evaluation/human_store.py seals with (it takes this object, and imports nothing of the registry).
    def sealed_path(self, path: Path) -> Path:
        return sealed_path(path)

    def seal_bytes(self, relative: str, data: bytes, out: Path) -> None:
        seal_bytes(self, relative, data, out)

    def unseal_bytes(self, relative: str, path: Path) -> bytes:
        return unseal_bytes(self, relative, path)

    def seal_file(self, job_dir: Path, path: Path) -> int:
        return seal_file(self, job_dir, path)


def job_key(session: Session, keys: KeyProvider, *, tenant_id: str, job_id: str, create: bool = False) -> JobKey | None:
    """The job's data key: unwrapped from its row, or (create) a new one wrapped under the tenant's live key
    version and recorded in this transaction. None when the job has none and create is False. Raises
    KeyUnavailable when the tenant key that wrapped it was destroyed (crypto-shredded)."""
    row = key_rows.find_job_key(session, job_id=job_id)
    if row is not None:
        if row.tenant_id != tenant_id:
            raise SealedFileRefused(f"job {job_id}'s files are sealed for another tenant")
        data_key = unwrap(keys, tenant_id, row.key_version, row.wrapped_key,
                          job_key_context(tenant_id, job_id, row.key_version))
        return JobKey(tenant_id, job_id, data_key)
    if not create:
        return None
    from tuneforge.db import tenants as tenant_rows

    tenant_rows.lock_tenant(session, tenant_id=tenant_id)  # a first key version is created by one writer at a time
    version = version_for_writing(session, keys, tenant_id)
    data_key = new_data_key()
    key_rows.add_job_key(session, job_id=job_id, tenant_id=tenant_id, key_version=version,
                         wrapped_key=wrap(keys, tenant_id, version, data_key, job_key_context(tenant_id, job_id, version)))
    return JobKey(tenant_id, job_id, data_key)


def sealed_path(path: Path) -> Path:
    return path.with_name(path.name + SEALED_SUFFIX)


def _files(job_dir: Path, parts: tuple[str, ...], *, sealed: bool) -> Iterator[Path]:
    """The regular files under parts, sealed ones (NAME.tfe) or plaintext ones; never a symbolic link."""
    for part in parts:
        top = job_dir / part
        for path in sorted(top.rglob("*")) if top.is_dir() else [top, sealed_path(top)]:
            if path.is_symlink() or not path.is_file() or path.name.endswith(PARTIAL_SUFFIX):
                continue
            if part == HUMAN_EVAL_DIR and path.name.startswith("."):
                continue
            if path.name.endswith(SEALED_SUFFIX) == sealed:
                yield path


def plaintext_files(job_dir: Path, parts: tuple[str, ...]) -> list[Path]:
    """The files under parts still plaintext (what seal_job_dir would seal)."""
    return list(_files(job_dir, parts, sealed=False))


@dataclass
class SealReport:
    files: int = 0
    bytes: int = 0  # plaintext bytes sealed
    seconds: float = 0.0


def seal_job_dir(db: Database, keys: KeyProvider, *, tenant_id: str, job_id: str, job_dir: Path,
                 parts: tuple[str, ...] = SEALED_PARTS) -> SealReport:
    """Seal every plaintext file under parts in place (NAME -> NAME.tfe, the plaintext removed once the
    ciphertext is on disk); half-written checkpoints a dead run left are removed. Idempotent: a file sealed
    already is left alone, and a plaintext file beside its sealed copy (a resumed run wrote it) replaces it."""
    started, report = time.perf_counter(), SealReport()
    checkpoints = job_dir / CHECKPOINTS_DIR
    for child in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
        if child.name.startswith(CHECKPOINT_STAGING):
            shutil.rmtree(child, ignore_errors=True)
    files = list(_files(job_dir, parts, sealed=False))
    if not files:
        return report
    with db.session() as session:
        key = job_key(session, keys, tenant_id=tenant_id, job_id=job_id, create=True)
    for path in files:
        report.bytes += seal_file(key, job_dir, path)
        report.files += 1
    report.seconds = time.perf_counter() - started
    return report


def seal_file(key: JobKey, job_dir: Path, path: Path) -> int:
    """One file sealed in place; returns its plaintext size. Written beside, fsynced, renamed, then the
    plaintext removed: a crash leaves the plaintext (sealed again next time) or both (the same)."""
    relative = path.relative_to(job_dir).as_posix()
    target = sealed_path(path)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(path, "rb") as source, os.fdopen(fd, "wb") as out:
            size = encrypt_stream(source, out, key.file_key(relative), context=key.context(relative))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    path.unlink()
    return size


def seal_human_eval(key: JobKey, job_dir: Path) -> SealReport:
    """Seal the plaintext files of DIR/human_eval/ (one made while encryption at rest was off, or before it), under
    the lock judgement uploads take, so none interleaves; a plaintext file beside its sealed copy replaces it (the
    plaintext is what readers take)."""
    import fcntl

    report, folder = SealReport(), job_dir / HUMAN_EVAL_DIR
    if not folder.is_dir():
        return report
    with open(folder / HUMAN_EVAL_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for path in _files(job_dir, (HUMAN_EVAL_DIR,), sealed=False):
                report.bytes += seal_file(key, job_dir, path)
                report.files += 1
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return report


def unseal_job_dir(db: Database, keys: KeyProvider, *, tenant_id: str, job_id: str, job_dir: Path,
                   parts: tuple[str, ...] = RESUME_PARTS) -> int:
    """Decrypt the sealed files under parts back in place (NAME.tfe -> NAME, 0600) for a run that resumes;
    returns how many. All or nothing: every file is decrypted beside its sealed copy first, and only when
    all of them authenticate are they renamed into place; otherwise SealedFileRefused names the first that
    did not (or says the key is gone) and no plaintext is left."""
    sealed = list(_files(job_dir, parts, sealed=True))
    if not sealed:
        return 0
    with db.session() as session:
        key = _existing_key(session, keys, tenant_id=tenant_id, job_id=job_id)
    done: list[tuple[Path, Path, Path]] = []  # (sealed, partial, plaintext)
    try:
        for path in sealed:
            plain = path.with_name(path.name[:-len(SEALED_SUFFIX)])
            partial = plain.with_name(plain.name + PARTIAL_SUFFIX)
            done.append((path, partial, plain))
            _decrypt(key, plain.relative_to(job_dir).as_posix(), path, partial)
    except BaseException:
        for _, partial, _ in done:
            partial.unlink(missing_ok=True)
        raise
    for path, partial, plain in done:
        os.replace(partial, plain)
        path.unlink()
    return len(done)


def _decrypt(key: JobKey, relative: str, sealed: Path, out: Path) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(sealed, "rb") as source, os.fdopen(fd, "wb") as sink, _refused_unless_authentic(key, relative):
        shutil.copyfileobj(SealedReader(source, key.file_key(relative), context=key.context(relative),
                                        close_source=False), sink, 1 << 20)


@contextmanager
def _refused_unless_authentic(key: JobKey, relative: str):
    """DecryptionFailed while reading the sealed job file `relative` raised as SealedFileRefused."""
    try:
        yield
    except DecryptionFailed as exc:
        raise SealedFileRefused(f"{relative} of job {key.job_id} (sealed at rest) does not authenticate: {exc}; "
                                "it was changed on disk after it was sealed, so it is not used") from None


def seal_bytes(key: JobKey, relative: str, data: bytes, out: Path) -> None:
    """data sealed as the job file `relative` (its key and context, wherever out is: a staging name the caller
    renames into place), written 0600 and fsynced."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as sink:
        encrypt_stream(io.BytesIO(data), sink, key.file_key(relative), context=key.context(relative))
        sink.flush()
        os.fsync(sink.fileno())


def unseal_bytes(key: JobKey, relative: str, path: Path) -> bytes:
    """The plaintext of the sealed job file `relative` at path; SealedFileRefused when it does not authenticate."""
    with open(path, "rb") as source, _refused_unless_authentic(key, relative):
        return SealedReader(source, key.file_key(relative), context=key.context(relative), close_source=False).read()


def job_key_or_shredded(session: Session, keys: KeyProvider, *, tenant_id: str, job_id: str,
                        create: bool = False) -> JobKey | None:
    """job_key, with a destroyed tenant key raised as JobKeyShredded (what readers answer 410 for)."""
    try:
        return job_key(session, keys, tenant_id=tenant_id, job_id=job_id, create=create)
    except KeyUnavailable as exc:
        raise JobKeyShredded(f"job {job_id}'s files cannot be read: the tenant key is gone: {exc} "
                             "(destroyed: crypto-shredded)") from None


def _existing_key(session: Session, keys: KeyProvider, *, tenant_id: str, job_id: str) -> JobKey:
    key = job_key_or_shredded(session, keys, tenant_id=tenant_id, job_id=job_id)
    if key is None:
        raise SealedFileRefused(f"job {job_id} has sealed files but no data key is recorded for it")
    return key


# ---- readers in the server ---------------------------------------------------------------------------


def job_file_exists(path: Path) -> bool:
    return path.is_file() or sealed_path(path).is_file()


def open_job_file(session: Session, keys: KeyProvider | None, *, tenant_id: str, job_id: str, job_dir: Path,
                  relative: str) -> BinaryIO:
    """A job file's plaintext as a stream: the file itself while it is plaintext (a running job's, or sealing
    off), else its sealed copy decrypted chunk by chunk (each chunk authenticated before its bytes are
    returned: a tampered one raises DecryptionFailed from read()). FileNotFoundError when neither exists."""
    path = job_dir / relative
    try:
        return open(path, "rb")
    except FileNotFoundError:
        if not sealed_path(path).is_file():
            raise
    if keys is None:
        raise SealedFileRefused(f"{relative} is sealed, and no tenant keys are configured (TUNEFORGE_KEYS_DIR)")
    key = _existing_key(session, keys, tenant_id=tenant_id, job_id=job_id)
    source = open(sealed_path(path), "rb")
    try:
        return io.BufferedReader(SealedReader(source, key.file_key(relative), context=key.context(relative)), 1 << 20)
    except BaseException:
        source.close()
        raise


def read_job_file(session: Session, keys: KeyProvider | None, *, tenant_id: str, job_id: str, job_dir: Path,
                  relative: str) -> bytes:
    """A job file's whole plaintext; SealedFileRefused when its sealed copy does not authenticate."""
    try:
        with open_job_file(session, keys, tenant_id=tenant_id, job_id=job_id, job_dir=job_dir,
                           relative=relative) as handle:
            return handle.read()
    except DecryptionFailed as exc:
        raise SealedFileRefused(f"{relative} (sealed at rest) does not authenticate: {exc}") from None


def plaintext_folder(db: Database, keys: KeyProvider | None, *, tenant_id: str, job_id: str, job_dir: Path, part: str,
                     dest: Path) -> Path:
    """A job's folder another job reads (the adapter a reward model, a judge or an export uses): the folder
    itself while it is plaintext, else a decrypted copy at dest (0700; the caller removes it with the reading
    job's inputs when its run ends). SealedFileRefused names a file that does not authenticate."""
    folder = job_dir / part
    if not any(_files(job_dir, (part,), sealed=True)):
        return folder
    if keys is None:
        raise SealedFileRefused(f"{part} of job {job_id} is sealed, and no tenant keys are configured")
    with db.session() as session:
        key = _existing_key(session, keys, tenant_id=tenant_id, job_id=job_id)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(mode=0o700, parents=True)
    try:
        for path in _files(job_dir, (part,), sealed=False):  # a file left plaintext (sealing was off meanwhile)
            shutil.copyfile(path, _under(dest, path.relative_to(folder)))
        for path in _files(job_dir, (part,), sealed=True):
            plain = path.with_name(path.name[:-len(SEALED_SUFFIX)])
            _decrypt(key, plain.relative_to(job_dir).as_posix(), path, _under(dest, plain.relative_to(folder)))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # no partial plaintext copy
        raise
    return dest


def _under(dest: Path, relative: Path) -> Path:
    out = dest / relative
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return out


def sealed_plaintext_size(path: Path) -> int:
    """The plaintext size of a sealed file, from its size and the chunk size in its header (no decryption):
    each chunk adds its 16-byte tag, the object a 16-byte header, and a sealed file has at least one chunk."""
    from tuneforge.registry.storage.envelope import HEADER, TAG

    with open(path, "rb") as handle:
        header = handle.read(HEADER.size)
    if len(header) != HEADER.size:
        raise SealedFileRefused(f"{path.name}: not a sealed file (too short)")
    chunk = HEADER.unpack(header)[1]
    body = path.stat().st_size - HEADER.size
    chunks = max(1, -(-body // (chunk + TAG)))
    return body - chunks * TAG


@dataclass(frozen=True)
class FolderEntry:
    """One entry of a job folder as a reader sees it: the plaintext name (relative to the folder), whether it is
    a directory, the plaintext size, and how to open it."""

    name: str
    is_dir: bool
    size: int
    path: Path
    relative: str  # to the job directory: the file's key and context
    sealed: bool


def folder_entries(session: Session, keys: KeyProvider | None, *, tenant_id: str, job_id: str, job_dir: Path,
                   part: str) -> tuple[JobKey | None, list[FolderEntry]]:
    """Every folder and file under DIR/part by plaintext name, sorted (NAME and NAME.tfe are one file, the
    plaintext winning), with the job's key when any is sealed: open_entry reads them without the session."""
    folder, entries = job_dir / part, {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_symlink() or path.name.endswith(PARTIAL_SUFFIX) or not (path.is_file() or path.is_dir()):
            continue
        sealed = path.is_file() and path.name.endswith(SEALED_SUFFIX)
        plain = path.with_name(path.name[:-len(SEALED_SUFFIX)]) if sealed else path
        name = plain.relative_to(folder).as_posix()
        if sealed and name in entries:
            continue
        size = 0 if path.is_dir() else sealed_plaintext_size(path) if sealed else path.stat().st_size
        entries[name] = FolderEntry(name, path.is_dir(), size, path, plain.relative_to(job_dir).as_posix(), sealed)
    key = None
    if any(entry.sealed for entry in entries.values()):
        if keys is None:
            raise SealedFileRefused(f"{part} of job {job_id} is sealed, and no tenant keys are configured")
        key = _existing_key(session, keys, tenant_id=tenant_id, job_id=job_id)
    return key, [entries[name] for name in sorted(entries)]


def open_entry(key: JobKey | None, entry: FolderEntry) -> BinaryIO:
    """An entry's plaintext stream (decrypted as it is read when sealed: a tampered chunk raises DecryptionFailed)."""
    source = open(entry.path, "rb")
    if not entry.sealed:
        return source
    try:
        return io.BufferedReader(SealedReader(source, key.file_key(entry.relative), context=key.context(entry.relative)),
                                 1 << 20)
    except BaseException:
        source.close()
        raise
