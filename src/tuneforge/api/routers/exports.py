"""/v1/models/{model_id}/exports: export a fine-tuned model for vLLM, SGLang, TGI or llama.cpp as an API call.

Each export is a scheduled job of method export (recipes/export_run.py runs export.export_model, with every
check `tuneforge export` makes); its status is the job's. Responses never show a server path: serve.json's
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
from tuneforge.api.dependencies import Caller, Config, Db
from tuneforge.api.errors import ApiError, not_found
from tuneforge.db import exports as export_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.home import tuneforge_home
from tuneforge.registry.models import model_name_of
from tuneforge.scheduler.admission import capacity_problem, live_inventories
from tuneforge.scheduler.submission import QuotaExceeded, submit_job
from tuneforge.spec.api import ListObject
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
def create_export(model_id: str, body: ExportCreateRequest, caller: Caller, db: Db, config: Config) -> ExportObject:
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
            return _export_object(export, job, config.jobs_dir)
    except QuotaExceeded as exc:
        raise ApiError(429, exc.problem.message, param=exc.problem.param, code=exc.problem.code,
                       type="rate_limit_error") from None


@router.get("", response_model=ListObject)
def list_exports(model_id: str, caller: Caller, db: Db, config: Config) -> ListObject:
    with db.session() as session:
        _model(session, caller, model_id)
        rows = export_rows.list_exports(session, tenant_id=caller.tenant_id, model_id=model_id)
        return ListObject(data=[_export_object(export, job, config.jobs_dir) for export, job in rows])


def _export(session, caller: Principal, model_id: str, export_id: str):
    _model(session, caller, model_id)
    found = export_rows.get_export(session, tenant_id=caller.tenant_id, model_id=model_id, export_id=export_id)
    if found is None:
        raise not_found("export", export_id, param="export_id")
    return found


@router.get("/{export_id}", response_model=ExportObject)
def get_export(model_id: str, export_id: str, caller: Caller, db: Db, config: Config) -> ExportObject:
    with db.session() as session:
        return _export_object(*_export(session, caller, model_id, export_id), config.jobs_dir)


@router.get("/{export_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "The export's files (tar)."}})
def download_export(model_id: str, export_id: str, caller: Caller, db: Db, config: Config) -> StreamingResponse:
    """The export's files (serve.json, the adapter / model / GGUF file, the chat template...) as a tar stream."""
    with db.session() as session:
        export, job = _export(session, caller, model_id, export_id)
        status = job.status
    if status != "succeeded":
        raise ApiError(409, f"export {export_id} is {status}; only a succeeded export has files", param="export_id",
                       code="invalid_export_state")
    root = config.jobs_dir / job.id / EXPORT_DIR
    return StreamingResponse(_tar_stream(root), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{export_id}.tar"'})


# ---- what a response shows ---------------------------------------------------------------------------


def _export_object(export, job, jobs_dir: Path) -> ExportObject:
    deploy = job.spec["deploy"]
    descriptor, placeholders = (_descriptor(jobs_dir / job.id / EXPORT_DIR) if job.status == "succeeded"
                                else (None, {}))
    fmt = descriptor["format"] if descriptor else deploy["format"]
    return ExportObject(id=export.id, model=export.model_id, created_at=export.created_at,
                        finished_at=job.finished_at, status=job.status, format=fmt, target=deploy["target"],
                        error=job.error, fallback_from=descriptor.get("fallback_from") if descriptor else None,
                        checks=descriptor.get("checks") if descriptor else None, descriptor=descriptor,
                        placeholders=placeholders)


def _descriptor(root: Path) -> tuple[dict | None, dict[str, str]]:
    """serve.json with every server path replaced: the export's own files by their names in the archive, an
    adapter's base by $BASE_MODEL, anything else under TUNEFORGE_HOME by $TUNEFORGE_HOME."""
    try:
        text = (root / SERVE_FILE).read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, ValueError):
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


def _tar_stream(root: Path):
    sink = _Chunks()
    with tarfile.open(fileobj=sink, mode="w|") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue  # the export writes plain files and folders only
            tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
            yield from sink.drain()
    yield from sink.drain()
