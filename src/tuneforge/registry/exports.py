"""Exports as registry artifacts: when an export job succeeds, its files (DIR/export) go into the content-addressed
store and its lineage (the model version it was made from, the export's choices and checks, the libraries) into
one more blob beside them; the export's id owns both in registry_blobs, so the collector keeps them and the
lineage outlives the job directory, the version (deleted later) and the export job's row.

Two doors make an export: the Exports API (a job of method export) and deploy: in a training job's spec (the
recipe exports its own output into DIR/export); both are recorded here, the same way, as a model export row.
The lineage is written once, when the export succeeds, and never changes (a content-addressed blob):
`tuneforge models lineage EXPORT_ID`, `tuneforge models lineage NAME@vN` (its exports) and the API's export
objects and version lineage read it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.db import exports as export_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db.identifiers import now
from tuneforge.db.tables import Job, ModelExport, ModelVersion
from tuneforge.registry.artifacts import CHUNK, LocalArtifactStore
from tuneforge.registry.lineage import chat_template_sha256, without_server_paths
from tuneforge.registry.versions import store_directory
from tuneforge.spec.jobdir import ENVIRONMENT_FILE, EXPORT_DIR, read_summary

LINEAGE_PATH = ".tuneforge/lineage.json"  # the lineage's blob among the export's rows; not a file of the export
MAX_LINEAGE_BYTES = 1 << 20
log = logging.getLogger("tuneforge.registry")


def remove_export_files(job_dir: Path) -> bool:
    """Remove a deleted export's files from its job directory (DIR/export, sealed or plain); True when there were
    any. The job's other files (its checkpoints and model, for a deploy: export) stay."""
    folder = job_dir / EXPORT_DIR
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def source_record(session: Session, *, tenant_id: str, model_id: str) -> dict[str, Any]:
    """The model version an export was made from (or the model alone, registered before versions existed)."""
    version = version_rows.version_of_model(session, tenant_id=tenant_id, model_id=model_id)
    if version is None:
        return {"model": model_id, "kind": "model"}
    return {"model": model_id, "kind": version.kind, "name": version.name, "version": f"v{version.version}",
            "version_id": version.id, "manifest_sha256": version.manifest_sha256,
            "base_model": (version.lineage or {}).get("base_model")}


def _origin(job: Job) -> str:
    """export_job: the Exports API's job of method export; deploy: a training job's deploy: exported its output."""
    return "export_job" if (job.spec or {}).get("method") == "export" else "deploy"


def export_lineage(session: Session, *, export: ModelExport, job: Job, job_dir: Path, manifest: dict[str, Any],
                   manifest_sha256: str) -> dict[str, Any]:
    descriptor = _read_json(job_dir / EXPORT_DIR / "serve.json") or {}
    deploy = (job.spec or {}).get("deploy") or {}
    return {
        "kind": "export",
        "export_id": export.id,
        "origin": _origin(job),
        "job_id": job.id,
        "tenant": export.tenant_id,
        "created_at": now(),
        "source": source_record(session, tenant_id=export.tenant_id, model_id=export.model_id),
        "format": descriptor.get("format") or deploy.get("format"),
        "target": deploy.get("target"),
        "deploy": {key: deploy.get(key) for key in ("format", "target", "fallback", "gguf_type", "gpu_type")},
        "fallback_from": descriptor.get("fallback_from"),
        "checks": without_server_paths(descriptor.get("checks"), None),
        "manifest_sha256": manifest_sha256,
        "files": len(manifest["files"]),
        "bytes": sum(entry["bytes"] for entry in manifest["files"]),
        "chat_template_sha256": chat_template_sha256(job_dir / EXPORT_DIR),
        "libraries": _read_json(job_dir / ENVIRONMENT_FILE),
    }


def _put_bytes(store: LocalArtifactStore, data: bytes, *, session: Session, tenant_id: str) -> tuple[str, int]:
    writer = store.open_staging(max_bytes=MAX_LINEAGE_BYTES, name="lineage.json", tenant_id=tenant_id)
    try:
        writer.write(data)
        staged = writer.finish()
        store.commit(staged, session=session)
        return staged.sha256, staged.size
    finally:
        writer.discard()


def register_export(session: Session, store: LocalArtifactStore, *, job: Job, job_dir: Path) -> dict[str, Any] | None:
    """Record a succeeded export's files and lineage in the registry; its lineage (None: no export row names the
    job: neither an Exports API export nor a recorded deploy:)."""
    export = export_rows.export_of_job(session, job_id=job.id)
    if export is None:
        return None
    # Sealed for the export's tenant with encryption at rest, like a version's files.
    manifest, digest = store_directory(store, job_dir / EXPORT_DIR, session=session, tenant_id=export.tenant_id)
    lineage = export_lineage(session, export=export, job=job, job_dir=job_dir, manifest=manifest, manifest_sha256=digest)
    sha256, size = _put_bytes(store, json.dumps(lineage, sort_keys=True, indent=1).encode(), session=session,
                              tenant_id=export.tenant_id)
    export_rows.record_artifact(session, export_id=export.id,
                                files=[*manifest["files"], {"path": LINEAGE_PATH, "sha256": sha256, "bytes": size}])
    return lineage


def register_deploy_export(session: Session, store: LocalArtifactStore, *, job: Job, job_dir: Path,
                           model_id: str) -> dict[str, Any] | None:
    """deploy: in a training job's spec: the export its recipe wrote to DIR/export, recorded as an export of the job's
    new model (model_id, registered just before) exactly as an Exports API export is; its lineage (None: deploy:
    made no export, or it failed and the summary says why)."""
    try:
        summary = read_summary(job_dir)
    except ValueError:
        return None
    deployment = summary.deployment if summary is not None else None
    if deployment is None or deployment.status != "succeeded" or not (job_dir / EXPORT_DIR / "serve.json").is_file():
        return None
    if export_rows.export_of_job(session, job_id=job.id) is None:
        export_rows.create_export(session, tenant_id=job.tenant_id, model_id=model_id, job_id=job.id)
    return register_export(session, store, job=job, job_dir=job_dir)


def export_artifact(session: Session, store: LocalArtifactStore, *, export: ModelExport) -> dict[str, Any] | None:
    """{"export_id", "files": [...], "lineage": {...}} of a recorded export; None until its job succeeded."""
    rows = export_rows.artifact_files(session, export_id=export.id)
    recorded = next((row for row in rows if row["path"] == LINEAGE_PATH), None)
    if recorded is None:
        return None
    content = store.find_content(session, tenant_id=export.tenant_id, sha256=recorded["sha256"], holder=export.job_id)
    try:
        if content is None:
            raise FileNotFoundError(recorded["sha256"])
        with store.open_content(content) as handle:  # a sealed lineage decrypted in memory
            lineage = json.loads(handle.read(MAX_LINEAGE_BYTES + CHUNK))
    except (OSError, ValueError, LookupError):  # missing, damaged, or its tenant key shredded
        log.error("the lineage of export %s cannot be read from the artifact store", export.id)
        lineage = None
    return {"export_id": export.id, "files": [row for row in rows if row["path"] != LINEAGE_PATH],
            "lineage": lineage}


def export_summary(session: Session, store: LocalArtifactStore, *, export: ModelExport, job: Job) -> dict[str, Any]:
    """One export of a version as its lineage lists it: the export, its status, how it was made and, once
    recorded, the digest of its files."""
    artifact = export_artifact(session, store, export=export) if job.status == "succeeded" else None
    lineage = (artifact or {}).get("lineage") or {}
    deploy = (job.spec or {}).get("deploy") or {}
    return {"id": export.id, "status": job.status, "created_at": export.created_at, "job_id": job.id,
            "origin": _origin(job),
            "format": lineage.get("format") or deploy.get("format"), "target": lineage.get("target") or deploy.get("target"),
            "fallback_from": lineage.get("fallback_from"), "manifest_sha256": lineage.get("manifest_sha256"),
            "files": lineage.get("files"), "bytes": lineage.get("bytes")}


def version_exports(session: Session, store: LocalArtifactStore, *, version: ModelVersion) -> list[dict[str, Any]]:
    """Every export of a version's model (scheduled, running, failed or recorded), oldest first."""
    return [export_summary(session, store, export=export, job=job)
            for export, job in export_rows.list_exports(session, tenant_id=version.tenant_id, model_id=version.model_id)]


def exports_of_version(session: Session, store: LocalArtifactStore, *, version: ModelVersion) -> list[dict[str, Any]]:
    """The recorded exports made from a version's model, oldest first."""
    found = []
    for export, _job in export_rows.list_exports(session, tenant_id=version.tenant_id, model_id=version.model_id):
        artifact = export_artifact(session, store, export=export)
        if artifact is not None:
            found.append(artifact)
    return found
