"""A job's inputs, decrypted for the recipe while it runs, and its outputs to the object store.

The worker that prepares a job decrypts its dataset files into DIR/inputs/ (0700): from the object store
when one is configured (workers that share no disk), else from the sealed blobs of its artifact folder.
It removes that folder when the job's run ends, and with it the tokenized copies the recipe made of those
inputs (remove_tokenized), so no plaintext copy outlives the job. After success it publishes the output
(DIR/adapter/ or DIR/model/), DIR/evaluation.json and DIR/export/ to the store, each file an object of
the tenant linked to the job id under its path in the job directory. A base model the operator registers is
published too (publish_base_model), so a worker on another machine can stage it like a version, and so are the
checkpoints retention keeps (publish_checkpoints: what training from one reads, not its resume state), which a
worker without the job directory stages (stage_checkpoint) to assemble ft:...:ckpt-step-N.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import select

from tuneforge.db.checkpoint_links import CHECKPOINT_KIND
from tuneforge.registry.artifacts import Content, ContentMissing, LocalArtifactStore
from tuneforge.registry.storage.envelope import DecryptionFailed
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.registry.storage.tenant_store import TenantStore, file_sha256, tenant_address
from tuneforge.spec.jobdir import ADAPTER_DIR, EXPORT_DIR, MERGED_BASE_DIR, MODEL_DIR, REPORT_FILE

INPUTS_DIR = "inputs"
DATASET_LINK = "data"
OUTPUT_KINDS = {ADAPTER_DIR: "adapter", MODEL_DIR: "model", EXPORT_DIR: "export", REPORT_FILE: "evaluation"}
# What a checkpoint's top level holds only to resume its run (engine/checkpoint.py save_training_checkpoint): the
# optimizer, scheduler and loss-scaler state, RNG states, the trainer state, and the manifest a resume verifies.
# The rest is what training from it reads: save_trainable's weights (and a value head), or FSDP's shards and
# DeepSpeed's partitions, which carry their optimizer state inside and are consolidated whole.
RESUME_ONLY = re.compile(r"(optimizer|scheduler|scaler|rng(-[0-9]+)?)\.pt|trainer_state\.json|manifest\.json")
# JobCheckpoint.metrics key (no column of its own): the published files' manifest, [{path, sha256, bytes}], which
# staging checks each fetched file against. The API shows only a checkpoint's numeric metrics.
PUBLISHED_FILES = "published_files"
# Registered base models are the operator's, no tenant's: their objects belong to this store-only owner (the dot
# keeps it out of tenant names, which are lowercase letters, digits and dashes) and are sealed under its own key.
BASE_MODELS_TENANT = "tuneforge.base-models"


class StoreUnavailable(OSError):
    """What a job needs from the object store, or gives to it, cannot be moved: the reason, no paths."""


@contextmanager
def _store_errors(what: str):
    try:
        yield
    except StoreUnavailable:
        raise
    except KeyUnavailable as exc:
        raise StoreUnavailable(f"{what}: the tenant key is gone: it was destroyed (crypto-shredded) ({exc})") from None
    except ContentMissing as exc:
        raise StoreUnavailable(f"{what}: {exc}") from None
    except DecryptionFailed as exc:
        raise StoreUnavailable(f"{what}: {exc}") from None
    except (BotoCoreError, ClientError) as exc:
        raise StoreUnavailable(f"{what}: the object store answered {exc}") from None
    except OSError as exc:
        raise StoreUnavailable(f"{what}: {exc.strerror or exc}") from None


def publish_dataset(store: TenantStore, *, tenant_id: str, file_id: str, blob: Path) -> None:
    """Put an uploaded file's bytes into the store for the tenant (once; later calls only re-link)."""
    store.put(tenant_id=tenant_id, path=blob, owner=file_id, name=DATASET_LINK, kind="dataset")


def stage_inputs(store: TenantStore | None, artifacts: LocalArtifactStore, *, tenant_id: str,
                 contents: dict[str, Content | None], job_dir: Path) -> dict[str, Path]:
    """The job's files (file id -> where this machine's artifact folder has them, None when it has not)
    as the paths the recipe reads: plaintext under DIR/inputs/FILE_ID. With an object store they are
    fetched from it, and a file not in it yet is published from the artifact folder first (the machine
    that received the upload); without one, a sealed blob is decrypted there, and a plaintext blob (an
    install from before sealing, or encryption at rest off) is read where it is. A file found nowhere is
    left out (the caller names it missing); one that cannot be read raises StoreUnavailable (a shredded
    key, a damaged blob) and leaves nothing staged."""
    folder = job_dir / INPUTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    staged = {}
    try:
        for file_id, content in contents.items():
            what = f"the data of {file_id} cannot be read"
            with _store_errors(what + ("" if store is None else " from the object store")):
                if store is None:
                    if content is not None:
                        staged[file_id] = (artifacts.write_plaintext(content, folder / file_id) if content.sealed
                                           else content.path)
                    continue
                linked = store.linked(tenant_id=tenant_id, owner=file_id).get(DATASET_LINK)
                if linked is None or not store.exists(linked[1]):
                    if content is None:
                        raise StoreUnavailable(f"the data of {file_id} is neither in the object store nor on this worker")
                    if content.sealed:  # decrypted once, here: published from this copy, and read by the recipe
                        staged[file_id] = artifacts.write_plaintext(content, folder / file_id)
                        publish_dataset(store, tenant_id=tenant_id, file_id=file_id, blob=staged[file_id])
                        continue
                    publish_dataset(store, tenant_id=tenant_id, file_id=file_id, blob=content.path)
                    linked = store.linked(tenant_id=tenant_id, owner=file_id)[DATASET_LINK]
                staged[file_id] = store.fetch(linked[1], folder / file_id)
    except BaseException:
        remove_inputs(job_dir)
        raise
    return staged


def remove_inputs(job_dir: Path) -> None:
    """The job's decrypted inputs gone (the job ended; a resume fetches them again)."""
    shutil.rmtree(job_dir / INPUTS_DIR, ignore_errors=True)


def remove_merged_bases(job_dir: Path) -> list[Path]:
    """The adapter chain a continued job merged into its base (DIR/base-merged, the bases under it, a staging copy):
    plaintext weights made from its decrypted inputs, so with encryption at rest they go with them (a run that
    resumes merges again: the float32 merge is deterministic). Returns what was removed."""
    removed = []
    for path in sorted([*job_dir.glob(f"{MERGED_BASE_DIR}*"), *job_dir.glob(f".{MERGED_BASE_DIR}*")]):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_tokenized(home: Path, *, sha256s: set[str]) -> list[Path]:
    """Remove the tokenization cache's entries (data/cache.py, under the recipe's TUNEFORGE_HOME) built from
    datasets with these digests: token ids are the text in another alphabet, so with encryption at rest
    they go when the job's decrypted inputs go. Each under the entry's build lock (the cache's .KEY.lock),
    so a build in progress is never cut. Returns the folders removed."""
    root = home / "cache" / "tokenized"
    removed = []
    for meta in sorted(root.glob("*/meta.json")) if root.is_dir() and sha256s else []:
        try:
            digest = json.loads(meta.read_text()).get("dataset_sha256")
        except (OSError, ValueError):
            continue
        if digest not in sha256s:
            continue
        with open(root / f".{meta.parent.name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(meta.parent, ignore_errors=True)
        removed.append(meta.parent)
    return removed


def remove_job_tokenized(db, *, job_id: str, home: Path) -> list[Path]:
    """remove_tokenized for the files of a job whose run ended, except those an unfinished job (this one too, when
    it was paused or re-queued) or a running sweep still reads."""
    from tuneforge.db import files as file_rows
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import sealed_blobs as blob_rows

    with db.read_session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        if job is None:
            return []
        ids = [fid for fid in (job.training_file, job.validation_file) if fid]
        digests = {row.sha256 for row in file_rows.files_by_id(session, file_ids=ids).values()}
        digests = {d for d in digests if not blob_rows.tokenized_copy_needed(session, sha256=d)}
    return remove_tokenized(home, sha256s=digests)


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
    """The job's published outputs, decrypted, under dest (e.g. to serve or export them elsewhere); not its
    kept checkpoints (stage_checkpoint)."""
    names = []
    for name, (kind, obj) in sorted(store.linked(tenant_id=tenant_id, owner=job_id).items()):
        if kind == CHECKPOINT_KIND:
            continue
        target = dest / name
        if not target.resolve().is_relative_to(dest.resolve()):
            continue  # a link name is a path inside the job directory, never outside dest
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fetch(obj, target)
        names.append(name)
    return names


def base_model_owner(manifest_sha256: str) -> str:
    """The link owner of a registered base model's files: its manifest's digest (fits the 64-character owner)."""
    return "base:" + manifest_sha256[:59]


def publish_base_model(store: TenantStore, *, directory: Path, manifest: dict, manifest_sha256: str) -> int:
    """Put a base model's files (as the manifest lists them) into the store, linked as MODEL_DIR/PATH of its
    owner; returns how many. Each stored object's content must be the manifest's (a file changed since it was
    hashed fails the registration), so what workers stage is what was registered."""
    owner = base_model_owner(manifest_sha256)
    for entry in manifest["files"]:
        with _store_errors(f"{entry['path']} cannot be written to the object store"):
            obj = store.put(tenant_id=BASE_MODELS_TENANT, path=directory / entry["path"], owner=owner,
                            name=f"{MODEL_DIR}/{entry['path']}", kind="model")
            if obj.address != tenant_address(BASE_MODELS_TENANT, entry["sha256"]):
                raise StoreUnavailable(f"{entry['path']} changed while it was being registered; register the "
                                       "directory again once nothing writes to it")
    return len(manifest["files"])


def _missing_files(store: TenantStore, artifacts: LocalArtifactStore, source) -> list[dict]:
    """The manifest entries this artifact folder lacks: for a tenant's version, its tenant's copy (sealed or not)."""
    entries = (source.manifest or {}).get("files", [])
    if source.tenant_id is None:
        return [entry for entry in entries if not artifacts.exists(entry["sha256"])]
    with store.db.read_session() as session:
        found = {entry["sha256"]: artifacts.find_content(session, tenant_id=source.tenant_id, sha256=entry["sha256"],
                                                         holder=source.job_id) for entry in entries}
    # A sealed blob's row is in the shared database, its file only on the machine that sealed it: absent here, it
    # is fetched (a shredded one is not: reading it fails with the shredded error, as it must).
    return [entry for entry in entries
            if (content := found[entry["sha256"]]) is None or (not content.shredded and not content.path.is_file())]


def _keep_fetched(store: TenantStore, artifacts: LocalArtifactStore, source, local: Path, staged) -> None:
    """A fetched, checked file into the artifact folder: sealed for the version's tenant when sealing is on (the
    plaintext in the work folder goes with it), else as a plaintext blob."""
    if source.tenant_id is None or not artifacts.seal:
        artifacts.commit(staged)
        return
    from tuneforge.registry.versions import put_stream

    with store.db.session() as session, open(local, "rb") as handle:
        put_stream(artifacts, handle, session=session, tenant_id=source.tenant_id)


def stage_registered_model(store: TenantStore, artifacts, *, tenant_id: str, source) -> int:
    """The files of a registered model version a job trains from (a registry.models.ModelSource, with the versions
    down its lineage), brought from the object store into this machine's artifact folder where they are missing:
    a worker on a machine that did not make the version can materialize it. Each file is the object its job
    published (DIR/adapter/PATH or DIR/model/PATH), or, for a registered base model, the object
    publish_base_model linked, checked against the manifest's SHA-256 and size before it becomes a blob.
    Returns how many files were fetched; StoreUnavailable names a file the store lacks."""
    from tuneforge.registry.artifacts import StagedBlob

    fetched = 0
    while source is not None:
        missing = _missing_files(store, artifacts, source)
        if missing:
            registered = source.registered_base is not None
            what = (f"the files of the registered base model {source.registered_base}" if registered
                    else f"the files of the model version made by job {source.job_id}")
            if not registered and (source.job_id is None or source.output is None):
                raise StoreUnavailable(f"{what}: not on this worker, and no job published them to the object store")
            with _store_errors(f"{what} cannot be read from the object store"):
                linked = (store.linked(tenant_id=BASE_MODELS_TENANT, owner=base_model_owner(source.manifest_sha256))
                          if registered else store.linked(tenant_id=tenant_id, owner=source.job_id))
                folder = artifacts.work_folder()
                try:
                    for entry in missing:
                        name = f"{source.output}/{entry['path']}"
                        if name not in linked:
                            hint = (" (registered before an object store was configured, or on a machine without"
                                    " it: `tuneforge models register --base` it again there)" if registered else "")
                            raise StoreUnavailable(f"{what}: {name} is not in the object store{hint}")
                        local = store.fetch(linked[name][1], folder.path / "blob")
                        digest, size = file_sha256(local), local.stat().st_size
                        if digest != entry["sha256"] or size != entry["bytes"]:
                            raise StoreUnavailable(f"{what}: {name} in the object store is not the registered file "
                                                   f"(sha256 {digest}, expected {entry['sha256']})")
                        _keep_fetched(store, artifacts, source, local, StagedBlob(local, entry["sha256"], size))
                        fetched += 1
                finally:
                    folder.remove()
        source = source.base
    return fetched


# ---- kept checkpoints ---------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[str]:
    """The paths (in a checkpoint's folder) of the files training from it reads: all but its resume state."""
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and not (p.parent == folder and RESUME_ONLY.fullmatch(p.name))]


def publish_checkpoints(store: TenantStore, *, tenant_id: str, job_id: str, job_dir: Path, keep_last: int,
                        best_step: int | None, keys=None) -> list[int]:
    """Put the checkpoints the retention policy keeps (registry/retention.py kept_checkpoints) into the store, each
    file an object of the tenant linked to the job as CHECKPOINT_PATH/FILE (kind checkpoint), and record their
    manifest in the checkpoint's row; returns the steps. A folder sealed at rest is decrypted (keys, the artifact
    folder's) into scratch first. Called before the job succeeds: registering its output applies the same policy."""
    from tuneforge.db.tables import JobCheckpoint
    from tuneforge.registry.retention import kept_checkpoints
    from tuneforge.registry.storage.job_files import plaintext_folder

    with store.db.read_session() as session:
        kept = [(row.id, row.path, row.step) for row in kept_checkpoints(
            session, job_id=job_id, job_dir=job_dir, keep_last=keep_last, best_step=best_step)]
    manifests = {}
    for row_id, path, step in kept:
        folder = store.scratch.work_folder()
        try:
            with _store_errors(f"checkpoint step {step} cannot be written to the object store"):
                plain = plaintext_folder(store.db, keys, tenant_id=tenant_id, job_id=job_id, job_dir=job_dir,
                                         part=path, dest=folder.path / "checkpoint")
                entries = []
                for relative in checkpoint_files(plain):
                    digest, size = file_sha256(plain / relative), (plain / relative).stat().st_size
                    obj = store.put(tenant_id=tenant_id, path=plain / relative, owner=job_id,
                                    name=f"{path}/{relative}", kind=CHECKPOINT_KIND)
                    if obj.address != tenant_address(tenant_id, digest):
                        raise StoreUnavailable(f"checkpoint step {step}: {relative} changed while it was published")
                    entries.append({"path": relative, "sha256": digest, "bytes": size})
        finally:
            folder.remove()
        manifests[row_id] = entries
    with store.db.session() as session:
        for row in session.scalars(select(JobCheckpoint).where(JobCheckpoint.id.in_(manifests))):
            row.metrics = {**(row.metrics or {}), PUBLISHED_FILES: manifests[row.id]}  # a new dict: JSON is not tracked
    return [step for _, _, step in kept]


def stage_checkpoint(store: TenantStore, *, tenant_id: str, job_id: str, path: str, step: int,
                     manifest: list[dict] | None, dest: Path) -> Path:
    """A kept checkpoint's published files (publish_checkpoints) fetched from the store into dest, each checked
    against its manifest's SHA-256 and size; dest is removed on any failure. StoreUnavailable names what is
    missing (a checkpoint kept before the store was configured, or whose object is gone) or does not match."""
    what = f"checkpoint step {step} of job {job_id}"
    if not manifest:
        raise StoreUnavailable(f"{what} is not on this worker, and its job published it to no object store (it was "
                               "kept before one was configured): run the job where it was trained, or train from the "
                               "model itself")
    try:
        with _store_errors(f"{what} cannot be read from the object store"):
            linked = store.linked(tenant_id=tenant_id, owner=job_id)
            dest.mkdir(mode=0o700, parents=True, exist_ok=True)
            root = dest.resolve()
            for entry in manifest:
                name, target = f"{path}/{entry['path']}", dest / entry["path"]
                if not target.resolve().is_relative_to(root):
                    raise StoreUnavailable(f"{what}: its manifest names {entry['path']!r}, outside the checkpoint")
                if name not in linked or not store.exists(linked[name][1]):
                    raise StoreUnavailable(f"{what}: {entry['path']} is not in the object store")
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                store.fetch(linked[name][1], target)
                digest, size = file_sha256(target), target.stat().st_size
                if digest != entry["sha256"] or size != entry["bytes"]:
                    raise StoreUnavailable(f"{what}: {entry['path']} in the object store is not the published file "
                                           f"(sha256 {digest}, expected {entry['sha256']})")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # no partial plaintext copy
        raise
    return dest
