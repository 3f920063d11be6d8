"""A fine-tuning job's evaluation through the API: its report (base vs fine-tuned, every metric with its
sample size and interval, example generations) and the human-evaluation round trip on its samples
(a blinded export, annotators' judgements uploaded as JSONL or CSV, win rates and agreement).

Both live in the job's directory (server state, DIR/evaluation.json and DIR/human_eval/); the job is
looked up for the caller's tenant first, so another tenant's job answers exactly like a missing one.
With encryption at rest both are sealed under the job's key (the human evaluation written sealed by these
requests); a job whose tenant key was destroyed answers 410 content_shredded.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tuneforge.api.dependencies import Config, Db, JobsCaller, Reader, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.db import jobs as job_rows
import tuneforge.evaluation.human_store as human_store
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.storage import job_files
from tuneforge.spec.human_eval import ExportFormat, HumanEval, HumanEvalCreateRequest, HumanEvalReport
from tuneforge.spec.jobdir import REPORT_FILE, EvaluationReport

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["evaluation"])
JOB_PARAM = "fine_tuning_job_id"


def _job(db, caller, job_id: str):
    with db.read_session() as session:
        row = job_rows.get_job(session, tenant_id=caller.tenant_id, job_id=job_id)
        if row is None:
            raise not_found("fine-tuning job", job_id, param=JOB_PARAM)
        session.expunge(row)
        return row


def _job_dir(db, caller, job_id: str, settings) -> Path:
    return settings.jobs_dir / _job(db, caller, job_id).id  # the row's id, never a path from the request


def _human_eval_dir(db, caller, job_id: str, settings) -> Path:
    job_dir = _job_dir(db, caller, job_id, settings)
    if not job_files.job_file_exists(job_dir / human_store.DIRECTORY / human_store.KEY_FILE):
        raise ApiError(404, f"job {job_id} has no human evaluation yet (POST /v1/fine_tuning/jobs/{job_id}/human_eval "
                            "makes one)", param=JOB_PARAM, code="not_found")
    return job_dir


@contextmanager
def _sealed(job_id: str, tenant_id: str):
    """A sealed human evaluation's refusals in the API's shape: 410 when the tenant key is gone, 500 when damaged."""
    try:
        yield
    except job_files.JobKeyShredded:
        raise ApiError(410, f"the human evaluation of {job_id} can no longer be read: tenant {tenant_id}'s encryption "
                            "key was destroyed (crypto-shredded)", param=JOB_PARAM, code="content_shredded") from None
    except (job_files.SealedFileRefused, human_store.SealedWithoutKey):
        raise ApiError(500, f"the human evaluation of {job_id} is damaged in storage (it does not authenticate, or "
                            "its key is missing) and cannot be read", param=JOB_PARAM,
                       code="artifact_damaged") from None


def _job_key(db, store: LocalArtifactStore, caller, job_id: str, *, writing: bool = False) -> job_files.JobKey | None:
    """The key of a job the caller's tenant was found to own, for its human evaluation: made when a write seals
    and the job has none yet (it ended before sealing); None when no tenant keys are configured, or (reading)
    the job has none."""
    if store.keys is None:
        return None
    create = writing and store.seal
    with _sealed(job_id, caller.tenant_id), (db.session() if create else db.read_session()) as session:
        return job_files.job_key_or_shredded(session, store.keys, tenant_id=caller.tenant_id, job_id=job_id,
                                             create=create)


def _read_report(db, store: LocalArtifactStore, job, settings) -> EvaluationReport | None:
    """DIR/evaluation.json, decrypted when the job's directory is sealed at rest (registry/storage/job_files.py)."""
    with db.read_session() as session:
        try:
            data = job_files.read_job_file(session, store.keys, tenant_id=job.tenant_id, job_id=job.id,
                                           job_dir=settings.jobs_dir / job.id, relative=REPORT_FILE)
        except FileNotFoundError:
            return None
        except job_files.JobKeyShredded:
            raise ApiError(410, f"the evaluation report of {job.id} can no longer be read: tenant {job.tenant_id}'s "
                                "encryption key was destroyed (crypto-shredded)", param=JOB_PARAM,
                           code="content_shredded") from None
        except job_files.SealedFileRefused:
            raise ApiError(500, f"the evaluation report of {job.id} is damaged in storage (it does not authenticate) "
                                "and cannot be read", param=JOB_PARAM, code="artifact_damaged") from None
    return EvaluationReport.model_validate_json(data)


@router.get("/{job_id}/evaluation", response_model=EvaluationReport)
def get_evaluation(job_id: str, caller: Reader, db: Db, settings: Config, store: Store) -> EvaluationReport:
    """tuneforge: the job's evaluation report (DIR/evaluation.json), written when the job succeeds."""
    job = _job(db, caller, job_id)
    report = _read_report(db, store, job, settings)
    if report is None:
        raise ApiError(404, f"job {job_id} has no evaluation report (a job writes it when it succeeds and its spec "
                            "evaluates)", param=JOB_PARAM, code="not_found")
    # The recipe names what it read and wrote by server paths; the API names them as the caller knows them.
    dataset = job.validation_file or f"{job.training_file} (validation split)"
    return report.model_copy(update={"dataset": dataset, "base_model": job.model,
                                     "fine_tuned_model": job.fine_tuned_model})


def _human_eval(job_id: str, job_dir: Path, key, tenant_id: str) -> HumanEval:
    with _sealed(job_id, tenant_id):
        return HumanEval(job_id=job_id, **human_store.status(job_dir, key=key))


def _report(job_id: str, report) -> HumanEvalReport:
    return HumanEvalReport.model_validate({"job_id": job_id, **report.to_dict()})


@router.post("/{job_id}/human_eval", response_model=HumanEval)
def create_human_eval(job_id: str, caller: JobsCaller, db: Db, settings: Config, store: Store,
                      body: HumanEvalCreateRequest | None = None) -> HumanEval:
    """tuneforge: export the job's evaluation samples (base vs fine-tuned) shuffled and blinded; the key
    that un-blinds them stays on the server."""
    job = _job(db, caller, job_id)
    job_dir = settings.jobs_dir / job.id
    report = _read_report(db, store, job, settings)
    key = _job_key(db, store, caller, job.id, writing=True) if report is not None else None
    try:
        with _sealed(job_id, caller.tenant_id):
            human_store.create(job_dir, seed=(body or HumanEvalCreateRequest()).seed, now=int(time.time()),
                               report=report, key=key if store.seal else None)
    except human_store.AlreadyExists:
        raise ApiError(409, f"job {job_id} already has a human evaluation", param=JOB_PARAM,
                       code="human_eval_exists") from None
    except human_store.NoSamples as exc:
        raise ApiError(409, f"job {job_id}: {exc}", param=JOB_PARAM, code="no_evaluation_samples") from None
    return _human_eval(job_id, job_dir, key, caller.tenant_id)


@router.get("/{job_id}/human_eval", response_model=HumanEval)
def get_human_eval(job_id: str, caller: Reader, db: Db, settings: Config, store: Store) -> HumanEval:
    job_dir = _human_eval_dir(db, caller, job_id, settings)
    return _human_eval(job_id, job_dir, _job_key(db, store, caller, job_id), caller.tenant_id)


@router.get("/{job_id}/human_eval/rows", response_class=Response,
            responses={200: {"content": {"application/jsonl": {}, "text/csv": {}}}})
def get_human_eval_rows(job_id: str, caller: Reader, db: Db, settings: Config, store: Store,
                        format: ExportFormat = "jsonl") -> Response:
    """tuneforge: the rows for annotators (row_id, prompt, left, right; CSV adds empty annotator and verdict)."""
    job_dir = _human_eval_dir(db, caller, job_id, settings)
    key = _job_key(db, store, caller, job_id)
    with _sealed(job_id, caller.tenant_id):
        text = human_store.export_text(job_dir, format, key=key)
    return Response(text, media_type="text/csv" if format == "csv" else "application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-human-eval.{format}"'})


def _judgement_target(db, store: LocalArtifactStore, caller, job_id: str, settings
                      ) -> tuple[Path, job_files.JobKey | None]:
    return _human_eval_dir(db, caller, job_id, settings), _job_key(db, store, caller, job_id, writing=True)


@router.post("/{job_id}/human_eval/judgements", response_model=HumanEvalReport)
async def upload_judgements(job_id: str, request: Request, caller: JobsCaller, db: Db, settings: Config, store: Store,
                            format: ExportFormat | None = None) -> HumanEvalReport:
    """tuneforge: import annotators' verdicts, the request body as JSONL or CSV (`format`, else the
    Content-Type: text/csv is CSV, anything else JSONL); every bad line is named and then nothing is
    imported. Returns the report over every upload so far."""
    # The job first, so another tenant's id is refused before the body is read; files and db off the loop.
    job_dir, key = await run_in_threadpool(_judgement_target, db, store, caller, job_id, settings)
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the judgements are not UTF-8 text (byte {exc.start})", code="invalid_file") from None
    if format is None:
        format = "csv" if request.headers.get("content-type", "").split(";")[0].strip() == "text/csv" else "jsonl"
    try:
        with _sealed(job_id, caller.tenant_id):
            report = await run_in_threadpool(human_store.add_judgements, job_dir, text, format=format,
                                             name=f"judgements.{format}", key=key, seal=store.seal and key is not None)
    except human_store.InvalidJudgements as exc:
        raise ApiError(400, str(exc), param="file", code="invalid_judgements") from None
    return _report(job_id, report)


@router.get("/{job_id}/human_eval/report", response_model=HumanEvalReport)
def get_human_eval_report(job_id: str, caller: Reader, db: Db, settings: Config, store: Store) -> HumanEvalReport:
    """tuneforge: win rates of the fine-tuned and the base model (Wilson intervals) and inter-annotator agreement."""
    job_dir = _human_eval_dir(db, caller, job_id, settings)
    key = _job_key(db, store, caller, job_id)
    with _sealed(job_id, caller.tenant_id):
        return _report(job_id, human_store.report(job_dir, key=key))
