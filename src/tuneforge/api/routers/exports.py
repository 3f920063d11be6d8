"""/v1/models/{model_id}/exports: export a fine-tuned model for vLLM, SGLang, TGI or llama.cpp as an API call.

Each export is a scheduled job of method export (recipes/export_run.py runs export.export_model, with every
check `tuneforge export` makes); its status is the job's. A training job's deploy: is listed here too, as an
export of the model it made (origin deploy). Each export names the version it was made from (source) and, once it
succeeded, its lineage in the registry (registry/exports.py). Responses never show a server path: serve.json's
commands name the export's files relative to the downloaded archive and an adapter's base as $BASE_MODEL.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from tuneforge.api.auth import Principal
from tuneforge.api.dependencies import Caller, Config, Db, JobsCaller, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.db import exports as export_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.home import tuneforge_home
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.exports import export_artifact, remove_export_files, source_record
from tuneforge.registry.models import model_name_of
from tuneforge.registry.storage import job_files
from tuneforge.scheduler.admission import capacity_problem, live_inventories
from tuneforge.scheduler.submission import QuotaExceeded, submit_job
from tuneforge.spec.api import ACTIVE_STATUSES, ListObject, RegistryDeleted
from tuneforge.spec.exports import ExportCreateRequest, ExportObject
from tuneforge.spec.job import NO_DATASET, JobSpec
from tuneforge.spec.jobdir import EXPORT_DIR

router = APIRouter(prefix="/v1/models/{model_id}/exports", tags=["exports"])
SERVE_FILE = "serve.json"
BASE_PLACEHOLDER = "$BASE_MODEL"


def _model(session, caller: Principal, model_id: str):
    row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=model_id)
    if row is None:
        raise not_found("model", model_id, param="model_id")
    return row


def _export_spec(source_job, model_id: str, body: ExportCreateRequest) -> JobSpec:
    """The export job: the model's own base, adapter and quantization (so deploy:'s checks see what was
    trained), the choices as deploy:."""
    trained = source_job.spec
    target = body.target or ("llama.cpp" if body.format == "gguf" else "vllm")
    deploy = {"target": target, "format": body.format, "fallback": body.fallback, "gguf_type": body.gguf_type,
              "gpu_type": body.gpu_type}
    model = {"base_model": trained["model"]["base_model"], "quantization": trained["model"].get("quantization", "none")}
    try:
        return JobSpec.model_validate({"method": "export", "name": model_name_of(source_job), "model": model,
                                       "adapter": trained.get("adapter") or {}, "dataset": {"path": NO_DATASET},
                                       "deploy": deploy, "export_run": {"model": model_id}})
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("deploy.", "")
        raise ApiError(400, f"model {model_id}: {message}", param="format", code="invalid_export") from None


@router.post("", response_model=ExportObject)
def create_export(model_id: str, body: ExportCreateRequest, caller: Caller, db: Db, store: Store,
                  config: Config) -> ExportObject:
    """Schedule an export of the caller's fine-tuned model."""
    with db.read_session() as session:
        row = _model(session, caller, model_id)
        source_job = job_rows.get_job_any_tenant(session, job_id=row.job_id)
        inventories = live_inventories(session)
    spec = _export_spec(source_job, model_id, body)
    if problem := capacity_problem(spec, inventories):
        raise ApiError(400, problem, param=None, code="insufficient_capacity")
    try:
        with db.session() as session:
            job = submit_job(session, tenant_id=caller.tenant_id, spec=spec, model=model_id, training_file="",
                             validation_file=None, suffix=None, metadata=None, idempotency_key=None, request_hash=None)
            export = export_rows.create_export(session, tenant_id=caller.tenant_id, model_id=model_id, job_id=job.id)
            return _export_object(session, store, export, job, config.jobs_dir)
    except QuotaExceeded as exc:
        raise ApiError(429, exc.problem.message, param=exc.problem.param, code=exc.problem.code,
                       type="rate_limit_error") from None


@router.get("", response_model=ListObject)
def list_exports(model_id: str, caller: Caller, db: Db, store: Store, config: Config) -> ListObject:
    with db.session() as session:
        _model(session, caller, model_id)
        rows = export_rows.list_exports(session, tenant_id=caller.tenant_id, model_id=model_id)
        return ListObject(data=[_export_object(session, store, export, job, config.jobs_dir) for export, job in rows])


def _export(session, caller: Principal, model_id: str, export_id: str):
    _model(session, caller, model_id)
    found = export_rows.get_export(session, tenant_id=caller.tenant_id, model_id=model_id, export_id=export_id)
    if found is None:
        raise not_found("export", export_id, param="export_id")
    return found


@router.get("/{export_id}", response_model=ExportObject)
def get_export(model_id: str, export_id: str, caller: Caller, db: Db, store: Store, config: Config) -> ExportObject:
    """The export, the version it was made from and, once it succeeded, its lineage."""
    with db.session() as session:
        return _export_object(session, store, *_export(session, caller, model_id, export_id), config.jobs_dir)


@router.delete("/{export_id}", response_model=RegistryDeleted)
def delete_export(model_id: str, export_id: str, caller: JobsCaller, db: Db, config: Config) -> RegistryDeleted:
    """Delete an export: its files in the job directory and the registry (once nothing else holds them) and its
    lineage; 409 while its export job may still run (cancel it first). The model and its version stay."""
    with db.session() as session:
        # Not through _model: a deleted model's exports stay (their lineage outlives the version) and may go later.
        found = export_rows.get_export(session, tenant_id=caller.tenant_id, model_id=model_id, export_id=export_id)
        if found is None:
            raise not_found("export", export_id, param="export_id")
        export, job = found
        if job.status in ACTIVE_STATUSES and job.model == model_id and not job.training_file:
            raise ApiError(409, f"export {export_id} is {job.status}: cancel its job first "
                                f"(POST /v1/fine_tuning/jobs/{job.id}/cancel)", param="export_id", code="export_in_use")
        export_rows.delete_export(session, export=export)
        job_id = job.id
    remove_export_files(config.jobs_dir / job_id)  # after the commit, as a version's files
    return RegistryDeleted(object="model.export", id=export_id)


@router.get("/{export_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "The export's files (tar)."}})
def download_export(model_id: str, export_id: str, caller: Caller, db: Db, config: Config,
                    store: Store) -> StreamingResponse:
    """The export's files (serve.json, the adapter / model / GGUF file, the chat template...) as a tar stream."""
    with db.session() as session:
        export, job = _export(session, caller, model_id, export_id)
        status = job.status
        if status == "succeeded":  # decrypted as they stream out when sealed at rest (registry/storage/job_files.py)
            try:
                key, entries = job_files.folder_entries(session, store.keys, tenant_id=job.tenant_id, job_id=job.id,
                                                        job_dir=config.jobs_dir / job.id, part=EXPORT_DIR)
            except job_files.JobKeyShredded:
                raise ApiError(410, f"the files of export {export_id} can no longer be read: the tenant's encryption "
                                    "key was destroyed (crypto-shredded)", param="export_id", code="content_shredded") from None
    if status != "succeeded":
        raise ApiError(409, f"export {export_id} is {status}; only a succeeded export has files", param="export_id",
                       code="invalid_export_state")
    return StreamingResponse(_tar_stream(key, entries), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{export_id}.tar"'})


# ---- what a response shows ---------------------------------------------------------------------------


def _export_object(session, store: LocalArtifactStore, export, job, jobs_dir: Path) -> ExportObject:
    deploy = job.spec["deploy"]
    descriptor, placeholders = (_descriptor(jobs_dir / job.id / EXPORT_DIR, _serve_json(session, store, job, jobs_dir))
                                if job.status == "succeeded" else (None, {}))
    fmt = descriptor["format"] if descriptor else deploy["format"]
    artifact = export_artifact(session, store, export=export) if job.status == "succeeded" else None
    lineage = artifact["lineage"] if artifact else None
    # Recorded: the version as it was when the export succeeded (it outlives the version); until then, as it is now.
    source = (lineage or {}).get("source") or source_record(session, tenant_id=export.tenant_id, model_id=export.model_id)
    return ExportObject(id=export.id, model=export.model_id, created_at=export.created_at,
                        finished_at=job.finished_at, status=job.status, format=fmt, target=deploy["target"],
                        error=job.error, fallback_from=descriptor.get("fallback_from") if descriptor else None,
                        checks=descriptor.get("checks") if descriptor else None, descriptor=descriptor,
                        placeholders=placeholders, origin="export_job" if job.spec.get("method") == "export" else "deploy",
                        source=source, lineage=lineage)


def _serve_json(session, store: LocalArtifactStore, job, jobs_dir: Path) -> str | None:
    """DIR/export/serve.json, decrypted when sealed at rest; None when it cannot be read."""
    try:
        return job_files.read_job_file(session, store.keys, tenant_id=job.tenant_id, job_id=job.id,
                                       job_dir=jobs_dir / job.id, relative=f"{EXPORT_DIR}/{SERVE_FILE}").decode("utf-8")
    except (OSError, ValueError):  # job_files.SealedFileRefused included
        return None


def _descriptor(root: Path, text: str | None) -> tuple[dict | None, dict[str, str]]:
    """serve.json (its text) with every server path replaced: the export's own files by their names in the
    archive, an adapter's base by $BASE_MODEL, anything else under TUNEFORGE_HOME by $TUNEFORGE_HOME."""
    try:
        raw = json.loads(text) if text is not None else None
    except ValueError:
        return None, {}
    if not isinstance(raw, dict):
        return None, {}
    placeholders = {}
    replacements = [(str(root) + "/", ""), (str(root), ".")]
    if raw.get("format") == "adapter" and raw.get("model_path"):
        replacements.insert(0, (raw["model_path"], BASE_PLACEHOLDER))
        placeholders[BASE_PLACEHOLDER] = "the base model's directory on the serving machine"
    replacements.append((str(tuneforge_home()), "$TUNEFORGE_HOME"))
    for old, new in replacements:
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return json.loads(text), placeholders


class _Chunks:
    """A write-only file for tarfile's stream mode: what it writes, handed out as chunks."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def drain(self):
        parts, self.parts = self.parts, []
        yield from parts


def _tar_stream(key, entries):
    """The export's folders and files (job_files.folder_entries: plain files and folders only, sealed ones
    decrypted as they go out; one that stops authenticating cuts the stream short, visibly)."""
    sink = _Chunks()
    with tarfile.open(fileobj=sink, mode="w|") as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = int(entry.path.stat().st_mtime)
            if entry.is_dir:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = entry.size, 0o644
                with job_files.open_entry(key, entry) as handle:
                    tar.addfile(info, handle)
            yield from sink.drain()
    yield from sink.drain()
