"""A job's inputs from the object store and its outputs back to it, for workers that share no disk.

The worker that prepares a job fetches (and decrypts) its dataset files into DIR/inputs/, and removes
that folder when the job ends, so no plaintext copy outlives the job. After success it publishes the
output (DIR/adapter/ or DIR/model/), DIR/evaluation.json and DIR/export/ to the store, each file an
object of the tenant linked to the job id under its path in the job directory.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tuneforge.registry.storage.envelope import DecryptionFailed
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.registry.storage.tenant_store import TenantStore
from tuneforge.spec.jobdir import ADAPTER_DIR, EXPORT_DIR, MODEL_DIR, REPORT_FILE

INPUTS_DIR = "inputs"
DATASET_LINK = "data"
OUTPUT_KINDS = {ADAPTER_DIR: "adapter", MODEL_DIR: "model", EXPORT_DIR: "export", REPORT_FILE: "evaluation"}


class StoreUnavailable(OSError):
    """What a job needs from the object store, or gives to it, cannot be moved: the reason, no paths."""


@contextmanager
def _store_errors(what: str):
    try:
        yield
    except StoreUnavailable:
        raise
    except KeyUnavailable as exc:
        raise StoreUnavailable(f"{what}: the tenant key is gone ({exc})") from None
    except DecryptionFailed as exc:
        raise StoreUnavailable(f"{what}: {exc}") from None
    except (BotoCoreError, ClientError) as exc:
        raise StoreUnavailable(f"{what}: the object store answered {exc}") from None
    except OSError as exc:
        raise StoreUnavailable(f"{what}: {exc.strerror or exc}") from None


def publish_dataset(store: TenantStore, *, tenant_id: str, file_id: str, blob: Path) -> None:
    """Put an uploaded file's bytes into the store for the tenant (once; later calls only re-link)."""
    store.put(tenant_id=tenant_id, path=blob, owner=file_id, name=DATASET_LINK, kind="dataset")


def stage_inputs(store: TenantStore, *, tenant_id: str, blobs: dict[str, Path], job_dir: Path) -> dict[str, Path]:
    """The job's files (file id -> this machine's blob path, which may be absent) as plaintext under
    DIR/inputs/FILE_ID, fetched from the store; a file not in the store yet is published from the local
    blob first (the machine that received the upload). Returns file id -> the path the recipe reads."""
    folder = job_dir / INPUTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    staged = {}
    try:
        for file_id, blob in blobs.items():
            with _store_errors(f"the data of {file_id} cannot be read from the object store"):
                linked = store.linked(tenant_id=tenant_id, owner=file_id).get(DATASET_LINK)
                if linked is None or not store.exists(linked[1]):
                    if not blob.is_file():
                        raise StoreUnavailable(f"the data of {file_id} is neither in the object store nor on this worker")
                    publish_dataset(store, tenant_id=tenant_id, file_id=file_id, blob=blob)
                    linked = store.linked(tenant_id=tenant_id, owner=file_id)[DATASET_LINK]
                staged[file_id] = store.fetch(linked[1], folder / file_id)
    except BaseException:
        remove_inputs(job_dir)
        raise
    return staged


def remove_inputs(job_dir: Path) -> None:
    """The job's decrypted inputs gone (the job ended; a resume fetches them again)."""
    shutil.rmtree(job_dir / INPUTS_DIR, ignore_errors=True)


def stale_input_folders(jobs_dir: Path, *, min_age_s: float) -> list[tuple[str, Path]]:
    """(job id, DIR/inputs) of job directories whose inputs nothing has written for min_age_s: candidates
    left by a worker that died (staging renames files into the folder, which keeps its mtime fresh)."""
    cutoff = time.time() - min_age_s
    found = []
    for folder in sorted(jobs_dir.glob(f"*/{INPUTS_DIR}")) if jobs_dir.is_dir() else []:
        try:
            if folder.is_dir() and not folder.is_symlink() and folder.stat().st_mtime < cutoff:
                found.append((folder.parent.name, folder))
        except FileNotFoundError:
            continue
    return found


def output_files(job_dir: Path) -> list[tuple[str, str]]:
    """(path in the job directory, kind) of what a succeeded job publishes."""
    found = []
    for top, kind in OUTPUT_KINDS.items():
        path = job_dir / top
        if path.is_file():
            found.append((top, kind))
        elif path.is_dir():
            found += [(p.relative_to(job_dir).as_posix(), kind) for p in sorted(path.rglob("*"))
                      if p.is_file() and not p.is_symlink()]
    return found


def publish_outputs(store: TenantStore, *, tenant_id: str, job_id: str, job_dir: Path) -> list[str]:
    """Put the job's outputs into the store, linked to the job; returns their paths."""
    published = []
    for name, kind in output_files(job_dir):
        with _store_errors(f"{name} cannot be written to the object store"):
            store.put(tenant_id=tenant_id, path=job_dir / name, owner=job_id, name=name, kind=kind)
        published.append(name)
    return published


def fetch_outputs(store: TenantStore, *, tenant_id: str, job_id: str, dest: Path) -> list[str]:
    """The job's published outputs, decrypted, under dest (e.g. to serve or export them elsewhere)."""
    names = []
    for name, (_, obj) in sorted(store.linked(tenant_id=tenant_id, owner=job_id).items()):
        target = dest / name
        if not target.resolve().is_relative_to(dest.resolve()):
            continue  # a link name is a path inside the job directory, never outside dest
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fetch(obj, target)
        names.append(name)
    return names
