"""Fine-tuned models: naming and registering what a succeeded job produced (as a version of a model name,
with its lineage), resolving what a job trains from, the deletion rules, and the base models.

A job's base model may be a built-in model, a base model an admin registered, a fine-tuned model id of
the caller's tenant (ft:...), or a registry reference, NAME@vN or NAME:ALIAS. References are pinned to
the ft: id at submission, so a moved alias never changes what a queued job trains from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db.checkpoint_links import drop_checkpoint_links
from tuneforge.db.tables import FineTunedModel, Job, JobCheckpoint, ModelVersion
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.checkpoints import (
    CheckpointRef,
    CheckpointUnavailable,
    assemble_checkpoint,
    kept_checkpoint,
    parse_checkpoint_id,
)
from tuneforge.registry.exports import register_deploy_export
from tuneforge.registry.lineage import job_lineage
from tuneforge.registry.retention import apply_retention
from tuneforge.registry.sweep_holds import sweeps_using_model
from tuneforge.registry.versions import file_contents, materialize, store_directory
from tuneforge.spec.api import ACTIVE_STATUSES
from tuneforge.spec.job import BUILTIN_BASE_MODELS, JobSpec
from tuneforge.spec.jobdir import MODEL_DIR
from tuneforge.spec.openai_jobs import REGISTERED_MODEL, named_models, registered_models

BASE_MODEL_OWNER = "tuneforge"
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
ALIAS = NAME
CHECKPOINT_SUFFIX = ":ckpt-step-"
MAX_LINEAGE_DEPTH = 32  # adapters trained on adapters: a chain this long is a loop, not a lineage
log = logging.getLogger("tuneforge.registry")


class RegistryError(LookupError):
    """A reference or a request the registry cannot serve; status is the HTTP status it maps to."""

    def __init__(self, message: str, *, status: int = 404, code: str = "model_not_found"):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def fine_tuned_model_id(job: Job) -> str:
    """OpenAI's shape, ft:BASE:ORG:SUFFIX:ID, with the job's id as the unique part. A job that continued
    training a fine-tuned model names the root base, as OpenAI does."""
    base = ((job.spec or {}).get("model") or {}).get("base_model") or job.model
    if base.startswith("ft:"):
        base = base.split(":")[1]
    elif base not in BUILTIN_BASE_MODELS and not NAME.fullmatch(base):
        base = job.model
    return f"ft:{base}:{job.tenant_id}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"


def model_name_of(job: Job) -> str:
    """The registry name a job's output is a version of: its suffix (spec name), else its base model's."""
    wanted = ((job.spec or {}).get("name") or job.suffix or "").lower()
    name = re.sub(r"[^a-z0-9-]+", "-", wanted).strip("-")[:64].strip("-")
    if not name:
        name = re.sub(r"[^a-z0-9-]+", "-", fine_tuned_model_id(job).split(":")[1].lower()).strip("-")[:64] or "model"
    return name


def register_job_output(session: Session, *, job: Job, job_dir: Path, home: Path, output: str,
                        store: LocalArtifactStore | None = None) -> FineTunedModel:
    """Record the adapter (or full model) a job wrote as a model of the job's tenant and, with a store, as
    the next version of its model name: files into the store (deduplicated), manifest, lineage; the export its
    deploy: made, as an export of that model with its own lineage; then the checkpoint retention policy."""
    location = os.path.relpath(job_dir / output, home)
    kind = "model" if output == "model" else "adapter"
    model = model_rows.create_model(
        session, model_id=fine_tuned_model_id(job), tenant_id=job.tenant_id, job_id=job.id, base_model=job.model,
        kind=kind, location=location,
    )
    if store is not None:
        # Sealed for the job's tenant with encryption at rest (dedupe stays within the tenant).
        manifest, digest = store_directory(store, job_dir / output, session=session, tenant_id=job.tenant_id)
        version_rows.create_version(
            session, tenant_id=job.tenant_id, name=model_name_of(job), model_id=model.id, job_id=job.id, kind=kind,
            manifest=manifest, manifest_sha256=digest,
            lineage=job_lineage(session, job=job, job_dir=job_dir, output=job_dir / output),
        )
        register_deploy_export(session, store, job=job, job_dir=job_dir, model_id=model.id)
        apply_retention(session, job_id=job.id, job_dir=job_dir,
                        keep_last=JobSpec.model_validate(job.spec).checkpoint.keep_last, best_step=_best_step(job_dir))
    return model


def _best_step(job_dir: Path) -> int | None:
    from tuneforge.spec.jobdir import read_summary

    try:
        summary = read_summary(job_dir)
    except ValueError:
        return None
    return summary.best_checkpoint.step if summary and summary.best_checkpoint else None


def remove_model_files(*, location: str, home: Path) -> bool:
    """Remove what a deleted model leaves on disk: its adapter (or model) directory and the checkpoints
    of the job that made it. Only ever inside TUNEFORGE_HOME's jobs, whatever the row says."""
    jobs = (home / "jobs").resolve()
    output = (home / location).resolve()
    if not output.is_relative_to(jobs) or output.parent == jobs:
        log.error("not removing the files of a model at %r: outside TUNEFORGE_HOME's jobs", location)
        return False
    for path in (output, output.parent / "checkpoints"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    return True


def base_models() -> tuple[str, ...]:
    return BUILTIN_BASE_MODELS


def all_base_models(session: Session) -> list[str]:
    """The built-in base models and those an admin registered."""
    return [*BUILTIN_BASE_MODELS, *(row.name for row in version_rows.list_base_models(session))]


# ---- references -------------------------------------------------------------------------------------


def parse_version(text: str) -> int:
    match = re.fullmatch(r"v?([0-9]{1,9})", text)
    if not match:
        raise RegistryError(f"version {text!r}: expected v1, v2, ... (or the number)", status=400, code="invalid_value")
    return int(match.group(1))


def find_version(session: Session, *, tenant_id: str, name: str, ref: str) -> ModelVersion:
    """A version of name by number (v2, 2) or alias (production)."""
    if re.fullmatch(r"v?[0-9]{1,9}", ref):
        version = version_rows.get_version(session, tenant_id=tenant_id, name=name, version=parse_version(ref))
    else:
        version = version_rows.alias_target(session, tenant_id=tenant_id, name=name, alias=ref)
    if version is None or version.deleted_at is not None:
        raise RegistryError(f"model {name!r} has no version or alias {ref!r}")
    return version


def resolve_base_reference(session: Session, *, tenant_id: str, ref: str) -> str:
    """The pinned base model of a job: a built-in or registered base model name, or an ft: model id."""
    if ref in BUILTIN_BASE_MODELS:
        return ref
    if ref.startswith("ft:"):
        if CHECKPOINT_SUFFIX in ref:
            return _resolve_checkpoint(session, tenant_id=tenant_id, ref=ref)
        if model_rows.get_model(session, tenant_id=tenant_id, model_id=ref) is None:
            raise RegistryError(f"no model with id {ref!r}")
        return ref
    name, sep, version_or_alias = ref.partition("@v") if "@v" in ref else ref.partition(":")
    if sep:
        return find_version(session, tenant_id=tenant_id, name=name,
                            ref=f"v{version_or_alias}" if sep == "@v" else version_or_alias).model_id
    if version_rows.get_base_model(session, name=ref) is not None:
        return ref
    raise RegistryError(f"model {ref!r} is not available on this server; expected one of "
                        f"{', '.join(all_base_models(session))}, a fine-tuned model id (ft:...) or NAME@vN / NAME:ALIAS")


def _resolve_checkpoint(session: Session, *, tenant_id: str, ref: str) -> str:
    """A kept checkpoint of one of the tenant's models, pinned as it is (a kept checkpoint never changes): a job's
    base model, or a reward or judge model (registry/named_models.py), another tenant's answering like a missing one."""
    parsed = parse_checkpoint_id(ref)
    model = model_rows.get_model(session, tenant_id=tenant_id, model_id=parsed[0]) if parsed else None
    if model is None:
        raise RegistryError(f"no model with id {ref!r}")
    if version_rows.version_of_model(session, tenant_id=tenant_id, model_id=model.id) is None:
        raise RegistryError(f"{ref}: its model was registered before model versions existed, so the registry holds no "
                            "files to assemble its checkpoints from; name the model itself", status=400,
                            code="invalid_value")
    if kept_checkpoint(session, job_id=model.job_id, step=parsed[1]) is None:
        raise RegistryError(f"{model.id} has no kept checkpoint at step {parsed[1]} (GET /v1/models lists the kept ones)")
    return ref


def lineage_chain(session: Session, *, version: ModelVersion) -> list[dict[str, Any]]:
    """The version, the version it was trained from, and so on, ending with the base model: newest first."""
    chain: list[dict[str, Any]] = []
    row: ModelVersion | None = version
    while row is not None and len(chain) < MAX_LINEAGE_DEPTH:
        lineage = row.lineage
        base = lineage.get("base_model") or {}
        chain.append({"name": row.name, "version": f"v{row.version}", "model": row.model_id, "kind": row.kind,
                      "manifest_sha256": row.manifest_sha256, "job_id": row.job_id, "base_model": base,
                      "datasets": lineage.get("datasets"), "seed": lineage.get("seed"), "created_at": row.created_at})
        trained_from = base.get("model", base.get("ref"))  # a checkpoint's: the model whose job kept it
        row = (version_rows.version_of_model(session, tenant_id=version.tenant_id, model_id=trained_from)
               if base.get("kind") in ("version", "checkpoint") else None)
        if row is None and base:
            chain.append({"base_model": base})
    return chain


def find_reference(session: Session, *, tenant_id: str, ref: str) -> ModelVersion:
    """A version by NAME@vN, NAME:ALIAS or NAME (its newest version)."""
    name, sep, rest = ref.partition("@") if "@" in ref else ref.partition(":")
    if sep:
        return find_version(session, tenant_id=tenant_id, name=name, ref=rest)
    versions = version_rows.list_versions(session, tenant_id=tenant_id, name=name)
    if not versions:
        raise RegistryError(f"no model named {name!r}")
    return versions[-1]


# ---- what a worker writes out for a job to train from -----------------------------------------------


@dataclass
class ModelSource:
    """Where a model's files come from: a name the recipe resolves itself (a built-in model), a directory,
    or a manifest in the store; an adapter also names the base it applies to."""

    as_is: str | None = None
    directory: Path | None = None
    manifest: dict[str, Any] | None = None
    base: ModelSource | None = None
    # A version's: the job that made it and the folder of its directory the files came from (adapter / model),
    # under which that job published them to the object store (registry/storage/jobs.py stage_registered_model).
    job_id: str | None = None
    output: str | None = None
    # A registered base model's: its name, and its manifest's digest, which names its files in the object store
    # (registry/storage/jobs.py publish_base_model).
    registered_base: str | None = None
    manifest_sha256: str | None = None
    # A version's tenant: whose sealed blobs its files are (None for a registered base model: plaintext blobs).
    tenant_id: str | None = None
    # A checkpoint of the version's job (ft:...:ckpt-step-N): its weights replace the version's final ones.
    checkpoint: CheckpointRef | None = None


def model_source(session: Session, *, tenant_id: str, base_model: str, home: Path, depth: int = 0) -> ModelSource:
    """How to materialize a job's pinned base model, following an adapter's lineage to its base."""
    if depth > MAX_LINEAGE_DEPTH:
        raise RegistryError(f"the lineage of {base_model} is deeper than {MAX_LINEAGE_DEPTH} models")
    registered = version_rows.get_base_model(session, name=base_model) if NAME.fullmatch(base_model) else None
    if registered is not None:
        return ModelSource(manifest=registered.manifest, output=MODEL_DIR, registered_base=registered.name,
                           manifest_sha256=registered.manifest_sha256)
    if not REGISTERED_MODEL.match(base_model):  # a built-in model (or a spec from the CLI's own door)
        return ModelSource(as_is=base_model)
    if (checkpoint := parse_checkpoint_id(base_model)) is not None:
        return _checkpoint_source(session, tenant_id=tenant_id, model_id=checkpoint[0], step=checkpoint[1], home=home,
                                  depth=depth)
    version = version_rows.version_of_model(session, tenant_id=tenant_id, model_id=base_model)
    if version is None:
        row = model_rows.get_model(session, tenant_id=tenant_id, model_id=base_model)
        if row is None:
            raise RegistryError(f"the model {base_model} this job trains from was deleted")
        return ModelSource(directory=home / row.location)  # registered before versions: the adapter's own base
    base = None
    if version.kind == "adapter":
        base = model_source(session, tenant_id=tenant_id, base_model=version.lineage["base_model"]["ref"], home=home,
                            depth=depth + 1)
    return ModelSource(manifest=version.manifest, base=base, job_id=version.job_id, output=version.kind,
                       tenant_id=version.tenant_id)


def _checkpoint_source(session: Session, *, tenant_id: str, model_id: str, step: int, home: Path,
                       depth: int) -> ModelSource:
    """The version of model_id (with the base it applies to) and, in its job directory, the kept checkpoint at step."""
    source = model_source(session, tenant_id=tenant_id, base_model=model_id, home=home, depth=depth + 1)
    model = model_rows.get_model(session, tenant_id=tenant_id, model_id=model_id)
    row = kept_checkpoint(session, job_id=model.job_id, step=step) if source.manifest is not None else None
    if row is None:
        raise RegistryError(f"the checkpoint {model_id}{CHECKPOINT_SUFFIX}{step} this job trains from is gone")
    return dataclasses.replace(source, checkpoint=CheckpointRef(job_dir=(home / model.location).parent, path=row.path,
                                                                step=step))


def materialize_source(store: LocalArtifactStore, source: ModelSource, root: Path, *, db=None,
                       private_root: Path | None = None, object_store=None) -> str:
    """What model.base_model becomes in the recipe's spec: a built-in name or a local directory. A tenant's version
    is read from its tenant's blobs (sealed ones decrypted; db looks them up) and, with private_root (encryption at
    rest: a job's inputs, a playground process's folder), written there rather than into the shared root. A kept
    checkpoint whose job directory is not on this machine is staged from object_store (a registry.storage
    TenantStore), when one is configured."""
    if source.as_is is not None:
        return source.as_is
    if source.directory is not None:
        return str(source.directory)
    if source.checkpoint is not None:
        return str(_materialize_checkpoint(store, source, root, db=db, private_root=private_root,
                                           object_store=object_store))
    base = (materialize_source(store, source.base, root, db=db, private_root=private_root, object_store=object_store)
            if source.base is not None else None)
    contents = None
    if source.tenant_id is not None and db is not None:
        with db.read_session() as session:
            contents = file_contents(session, store, source.manifest, tenant_id=source.tenant_id,
                                     holder=source.job_id)
    target_root = private_root if source.tenant_id is not None and private_root is not None else root
    return str(materialize(store, source.manifest, target_root, base=base, contents=contents))


def _materialize_checkpoint(store: LocalArtifactStore, source: ModelSource, root: Path, *, db,
                            private_root: Path | None, object_store=None) -> Path:
    """The version materialized as usual, then beside it the same files with the checkpoint's weights: read from its
    job directory (decrypted, when it is sealed at rest, into a scratch folder removed once they are copied) or, on
    a machine without that directory, fetched from the object store into that scratch folder."""
    from tuneforge.registry.storage.job_files import plaintext_folder

    checkpoint = source.checkpoint
    version_dir = Path(materialize_source(store, dataclasses.replace(source, checkpoint=None), root, db=db,
                                          private_root=private_root, object_store=object_store))
    label = f"checkpoint step {checkpoint.step} of job {source.job_id}"
    here = (checkpoint.job_dir / checkpoint.path).is_dir()
    if not here and object_store is None:
        raise CheckpointUnavailable(f"{label} is not on this worker, and no object store is configured to stage it "
                                    "from (TUNEFORGE_STORE_URL): run the job where it was trained, or share the job root")
    target_root = version_dir.parent
    target_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target_root, prefix=".staging-checkpoint-"))
    try:
        if here:
            weights = plaintext_folder(db, store.keys, tenant_id=source.tenant_id, job_id=source.job_id,
                                       job_dir=checkpoint.job_dir, part=checkpoint.path, dest=scratch / "weights")
        else:
            weights = _staged_checkpoint(object_store, source, dest=scratch / "weights", label=label)
        return assemble_checkpoint(version_dir, weights, target_root, kind=source.output, step=checkpoint.step,
                                   label=label)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _staged_checkpoint(object_store, source: ModelSource, *, dest: Path, label: str) -> Path:
    """The checkpoint's published files from the object store, checked against the manifest its row records."""
    from tuneforge.registry.storage.jobs import PUBLISHED_FILES, StoreUnavailable, stage_checkpoint

    checkpoint = source.checkpoint
    with object_store.db.read_session() as session:
        row = kept_checkpoint(session, job_id=source.job_id, step=checkpoint.step)
        manifest = (row.metrics or {}).get(PUBLISHED_FILES) if row is not None else None
    if row is None:
        raise CheckpointUnavailable(f"{label} is gone: the retention policy or the model's deletion removed it")
    try:
        return stage_checkpoint(object_store, tenant_id=source.tenant_id, job_id=source.job_id, path=checkpoint.path,
                                step=checkpoint.step, manifest=manifest, dest=dest)
    except StoreUnavailable as exc:
        raise CheckpointUnavailable(str(exc)) from None


# ---- deletion ---------------------------------------------------------------------------------------


def uses_model(spec: dict[str, Any], model_id: str) -> bool:
    """Whether a job's spec trains from model_id (or one of its checkpoints) or uses it as a reward, judge or
    evaluated model."""
    try:
        parsed = JobSpec.model_validate(spec)
    except ValueError:
        return False
    return _uses_model(parsed, model_id)


def _uses_model(spec: JobSpec, model_id: str) -> bool:
    return any(found == model_id or found.startswith(model_id + CHECKPOINT_SUFFIX)  # a checkpoint of it, too
               for _, found in registered_models(spec))


def delete_model_and_version(session: Session, *, model: FineTunedModel) -> None:
    """Delete a fine-tuned model and its version, unless an alias, a job not finished yet or a running sweep uses
    it (RegistryError 409 naming them). Its files go after the commit (remove_model_files); the object-store links
    of its kept checkpoints go now."""
    version = version_rows.version_of_model(session, tenant_id=model.tenant_id, model_id=model.id)
    if version is not None:
        blockers = version_rows.deletion_blockers(session, version=version, active_statuses=ACTIVE_STATUSES,
                                                  uses_model=uses_model)
    else:
        blockers = [f"job {job_id} ({status}) uses it" for job_id, status, spec in session.execute(
            select(Job.id, Job.status, Job.spec).where(Job.tenant_id == model.tenant_id,
                                                       Job.status.in_(ACTIVE_STATUSES))) if uses_model(spec, model.id)]
    blockers += sweeps_using_model(session, tenant_id=model.tenant_id, names=lambda spec: _uses_model(spec, model.id))
    if blockers:
        label = f"{version.name} v{version.version}" if version is not None else model.id
        raise RegistryError(f"{label} cannot be deleted: {'; '.join(blockers)}", status=409, code="model_in_use")
    if version is not None:
        version_rows.delete_version(session, version=version)
    model_rows.delete_model(session, model=model)
    # Its kept checkpoints go with it: their objects in the store are collected once nothing links them.
    drop_checkpoint_links(session, job_id=model.job_id)


# ---- checkpoints, as OpenAI lists them among the models ---------------------------------------------


def checkpoint_models(session: Session, *, models: list[FineTunedModel]) -> list[tuple[str, int, str]]:
    """(ft:...:ckpt-step-N, created, tenant) of every kept checkpoint of these models' jobs."""
    by_job = {model.job_id: model for model in models}
    if not by_job:
        return []
    rows = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id.in_(by_job))
                           .order_by(JobCheckpoint.job_id, JobCheckpoint.step))
    return [(f"{by_job[row.job_id].id}{CHECKPOINT_SUFFIX}{row.step}", row.created_at, by_job[row.job_id].tenant_id)
            for row in rows]


# ---- base models an admin registers -----------------------------------------------------------------


def _stored_base_model(store: LocalArtifactStore, *, name: str, directory: Path, registered_sha256: str | None):
    """A base model directory's files into the artifact store, checked first; (manifest, digest)."""
    if not NAME.fullmatch(name) or name in BUILTIN_BASE_MODELS:
        raise RegistryError(f"base model name {name!r}: expected lowercase letters, digits and dashes (at most 64), "
                            f"not a built-in model's", status=400, code="invalid_value")
    if not (directory / "config.json").is_file():
        raise RegistryError(f"{directory}: not a Hugging Face model directory (no config.json)", status=400,
                            code="invalid_value")
    manifest, digest = store_directory(store, directory)
    if registered_sha256 is not None and registered_sha256 != digest:
        raise RegistryError(f"a base model named {name!r} is registered already, with other files "
                            f"(sha256:{registered_sha256[:12]}); choose another name", status=409, code="conflict")
    return manifest, digest


def register_base_model(session: Session, store: LocalArtifactStore, *, name: str, directory: Path):
    """Copy a local Hugging Face model directory into the store as the base model `name` (CLI, admin only)."""
    if NAME.fullmatch(name) and version_rows.get_base_model(session, name=name) is not None:
        raise RegistryError(f"a base model named {name!r} is registered already", status=409, code="conflict")
    manifest, digest = _stored_base_model(store, name=name, directory=directory, registered_sha256=None)
    return version_rows.create_base_model(session, name=name, manifest=manifest, manifest_sha256=digest)


def names_model(spec: dict[str, Any], name: str) -> bool:
    """Whether a job's spec names the model `name` anywhere (base, reward, judge, evaluated, exported model)."""
    try:
        parsed = JobSpec.model_validate(spec)
    except ValueError:
        return False
    return _names_model(parsed, name)


def _names_model(spec: JobSpec, name: str) -> bool:
    return any(found == name for _, found in named_models(spec))


def delete_base_model(session: Session, *, name: str) -> None:
    """Delete the base model an admin registered as `name`, unless a job not finished yet or a running sweep (of
    any tenant) names it or a live adapter was trained on it (RegistryError 409 naming them). Its blobs and its
    objects in the object store are collected once nothing else holds them (scheduler/blobs.py)."""
    if name in BUILTIN_BASE_MODELS:
        raise RegistryError(f"{name} is a built-in base model: it ships with tuneforge and cannot be deleted",
                            status=403, code="forbidden")
    base = version_rows.get_base_model(session, name=name) if NAME.fullmatch(name) else None
    if base is None:
        raise RegistryError(f"no base model named {name!r} is registered")
    blockers = version_rows.base_model_blockers(session, name=name, active_statuses=ACTIVE_STATUSES,
                                                names_model=names_model)
    blockers += sweeps_using_model(session, tenant_id=None, names=lambda spec: _names_model(spec, name))
    if blockers:
        raise RegistryError(f"base model {name} cannot be deleted: {'; '.join(blockers)}", status=409,
                            code="model_in_use")
    version_rows.delete_base_model(session, base=base)


def register_published_base_model(db, store: LocalArtifactStore, object_store, *, name: str,
                                  directory: Path) -> tuple[dict[str, Any], str]:
    """register_base_model with an object store (a registry.storage TenantStore): the files go into it too,
    before the row exists, so a worker on another machine can stage them (outside any write transaction: the
    store records its objects in the same database). The same files registered again under their name are
    published again (a base model registered before the store was configured); other files are refused.
    Returns (manifest, digest)."""
    from tuneforge.registry.storage.jobs import publish_base_model

    with db.read_session() as session:
        existing = version_rows.get_base_model(session, name=name) if NAME.fullmatch(name) else None
        registered_sha256 = existing.manifest_sha256 if existing is not None else None
    manifest, digest = _stored_base_model(store, name=name, directory=directory, registered_sha256=registered_sha256)
    publish_base_model(object_store, directory=directory, manifest=manifest, manifest_sha256=digest)
    if existing is None:
        with db.session() as session:
            if version_rows.get_base_model(session, name=name) is not None:  # registered meanwhile
                raise RegistryError(f"a base model named {name!r} is registered already", status=409, code="conflict")
            version_rows.create_base_model(session, name=name, manifest=manifest, manifest_sha256=digest)
    return manifest, digest
