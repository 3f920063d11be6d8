"""/v1/fine_tuning/jobs: create (validated, capacity-checked, idempotent), list, retrieve, cancel, pause,
resume, events, checkpoints; and tuneforge's own: a dry-run plan, the metrics series, a live event stream."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError

from tuneforge.api.auth import Principal
from tuneforge.api.dependencies import Db, JobsCaller, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.streams import EventStreams, SlotStreamingResponse
from tuneforge.api.objects import checkpoint_object, event_object, job_object, metric_point, page
from tuneforge.db import dataset_versions as dataset_rows
from tuneforge.db import files as file_rows
from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db.session import Database
from tuneforge.registry.dataset_versions import DatasetError, pin_references
from tuneforge.registry.models import RegistryError, resolve_base_reference
from tuneforge.registry.named_models import NamedModelError, check_named_models
from tuneforge.scheduler import states
from tuneforge.scheduler.admission import live_inventories
from tuneforge.scheduler import cost
from tuneforge.scheduler.submission import QuotaExceeded, budget_problem, check_submission, submit_job
from tuneforge.spec.api import (
    TERMINAL_STATUSES,
    FineTuningJob,
    JobCreateRequest,
    JobPlan,
    ListObject,
)
from tuneforge.spec.job import JobSpec
from tuneforge.spec.openai_jobs import RequestError, job_spec_from_request

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
STREAM_KEEPALIVE_SECONDS = 15.0
STREAM_BATCH = 500  # events per read; a stream that is behind reads again at once
ROLES = {"training_file": "training", "validation_file": "validation"}  # a named dataset version's role


def _pin_datasets(request: JobCreateRequest, session, caller: Principal) -> tuple[JobCreateRequest, dict[str, str]]:
    """The request with each dataset:NAME@vN / dataset:NAME:ALIAS in training_file / validation_file replaced by
    the file id that version holds now (pinned: a moved alias never changes what a created job trains on), and
    role -> the version id each reference named. Another tenant's dataset answers like a missing one."""
    try:
        versions = pin_references(session, tenant_id=caller.tenant_id, fields={
            "training_file": request.training_file, "validation_file": request.validation_file})
    except DatasetError as exc:
        raise ApiError(400, exc.message, param=exc.field, code=exc.code) from None
    files = {param: version.file_id for param, version in versions.items()}
    named = {ROLES[param]: version.id for param, version in versions.items()}
    return (request.model_copy(update=files) if files else request), named


def _spec_for(request: JobCreateRequest, session, caller: Principal) -> JobSpec:
    try:
        spec = job_spec_from_request(request)
    except RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    for param, file_id in (("training_file", request.training_file), ("validation_file", request.validation_file)):
        if file_id is None:
            continue
        row = file_rows.get_file(session, tenant_id=caller.tenant_id, file_id=file_id)
        if row is None:
            raise ApiError(400, f"{param}: no file with id {file_id!r}", param=param, code="file_not_found")
        if row.purpose != "fine-tune":
            raise ApiError(400, f"{param}: file {file_id} has purpose {row.purpose!r}, expected 'fine-tune'", param=param)
    try:  # a registered base model, an ft: id or NAME@vN / NAME:ALIAS, pinned to the model it names now
        spec.model.base_model = resolve_base_reference(session, tenant_id=caller.tenant_id, ref=spec.model.base_model)
    except RegistryError as exc:
        raise ApiError(400, f"model: {exc.message}", param="model", code=exc.code) from None
    try:  # reward and judge models: the caller's own models or their kept checkpoints, as the base is
        check_named_models(session, tenant_id=caller.tenant_id, spec=spec)
    except NamedModelError as exc:
        raise ApiError(400, exc.message, param=f"tuneforge.{exc.where}", code=exc.code) from None
    return spec


def _request_hash(request: JobCreateRequest) -> str:
    canonical = json.dumps(request.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session, caller: Principal, key: str, digest: str) -> FineTuningJob | None:
    existing = job_rows.find_by_idempotency_key(session, tenant_id=caller.tenant_id, key=key)
    if existing is None:
        return None
    if existing.request_hash != digest:
        raise ApiError(409, "this Idempotency-Key was already used with a different request body",
                       param="Idempotency-Key", code="idempotency_key_reused")
    return job_object(existing)


@router.post("", response_model=FineTuningJob)
def create_job(body: JobCreateRequest, caller: JobsCaller, db: Db,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> FineTuningJob:
    digest = _request_hash(body)
    # Read and check first (the planner runs outside any transaction), then one short write transaction.
    with db.read_session() as session:
        if idempotency_key and (replayed := _replay(session, caller, idempotency_key, digest)):
            return replayed
        pinned, named = _pin_datasets(body, session, caller)
        spec = _spec_for(pinned, session, caller)
        inventories = live_inventories(session)
        estimate = cost.estimate_job(session, tenant_id=caller.tenant_id, spec=spec, inventories=inventories)
    problem = check_submission(spec, inventories).problem or budget_problem(spec, estimate)
    if problem:
        raise ApiError(400, problem.message, param=problem.param, code=problem.code)
    try:
        with db.session() as session:
            job = submit_job(
                session, tenant_id=caller.tenant_id, spec=spec, model=body.model, training_file=pinned.training_file,
                validation_file=pinned.validation_file, suffix=body.suffix, metadata=body.metadata,
                idempotency_key=idempotency_key, request_hash=digest, estimate=estimate,
            )
            for role, version_id in named.items():  # what the model's lineage names, whatever the alias does later
                dataset_rows.record_job_dataset(session, job_id=job.id, role=role, version_id=version_id)
            return job_object(job)
    except QuotaExceeded as exc:
        raise ApiError(429, exc.problem.message, param=exc.problem.param, code=exc.problem.code,
                       type="rate_limit_error") from None
    except IntegrityError:
        # Two retries with the same key raced; the other one created the job.
        with db.read_session() as session:
            replayed = _replay(session, caller, idempotency_key or "", digest)
            if replayed is None:
                raise
            return replayed


@router.post("/plan", response_model=JobPlan)
def plan_job(body: JobCreateRequest, caller: JobsCaller, db: Db) -> JobPlan:
    """tuneforge: what a job request would ask for and whether the workers can hold it; creates nothing."""
    with db.read_session() as session:
        spec = _spec_for(_pin_datasets(body, session, caller)[0], session, caller)
        inventories = live_inventories(session)
        estimate = cost.estimate_job(session, tenant_id=caller.tenant_id, spec=spec, inventories=inventories)
    check = check_submission(spec, inventories)
    problem = check.problem or budget_problem(spec, estimate)
    resources = spec.resources
    # The capacity view shows what the cluster offers, never which hosts or processes offer it.
    capacity = [{"executor": inventory["executor"], "nodes": inventory["nodes"]} for inventory in inventories]
    return JobPlan(
        spec=spec.model_dump(mode="json"), gpus=resources.num_gpus * resources.num_nodes, gpu_type=resources.gpu_type,
        fits=problem is None, reason=problem.message if problem else None, capacity=capacity,
        memory=check.memory, cost=estimate.to_dict() if estimate is not None else None,
    )


@router.get("", response_model=ListObject)
def list_jobs(request: Request, caller: Reader, db: Db, after: str | None = None,
              limit: int = Query(20, ge=1, le=100)) -> ListObject:
    metadata = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                if key.startswith("metadata[") and key.endswith("]")}
    with db.session() as session:
        rows, more = job_rows.list_jobs(session, tenant_id=caller.tenant_id, limit=limit, after=after, metadata=metadata)
        return page([job_object(r) for r in rows], more)


def _job(session, caller: Principal, job_id: str):
    row = job_rows.get_job(session, tenant_id=caller.tenant_id, job_id=job_id)
    if row is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return row


@router.get("/{job_id}", response_model=FineTuningJob)
def get_job(job_id: str, caller: Reader, db: Db) -> FineTuningJob:
    with db.session() as session:
        return job_object(_job(session, caller, job_id))


def _act(db: Database, caller: Principal, job_id: str, action, verb: str, allowed: str) -> FineTuningJob:
    with db.session() as session:
        job = _job(session, caller, job_id)
        if not action(session, job_id=job_id):
            raise ApiError(409, f"job {job_id} is {job.status}; only {allowed} jobs can be {verb}",
                           param="fine_tuning_job_id", code="invalid_job_state")
    with db.session() as session:
        return job_object(_job(session, caller, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, caller: JobsCaller, db: Db) -> FineTuningJob:
    return _act(db, caller, job_id, states.cancel, "cancelled", "validating, queued, running or paused")


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause_job(job_id: str, caller: JobsCaller, db: Db) -> FineTuningJob:
    return _act(db, caller, job_id, states.pause, "paused", "queued or running")


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume_job(job_id: str, caller: JobsCaller, db: Db) -> FineTuningJob:
    return _act(db, caller, job_id, states.resume, "resumed", "paused")


@router.get("/{job_id}/events", response_model=ListObject)
def list_events(job_id: str, caller: Reader, db: Db, after: str | None = None,
                limit: int = Query(20, ge=1, le=1000)) -> ListObject:
    with db.session() as session:
        _job(session, caller, job_id)
        rows, more = event_rows.list_events(session, job_id=job_id, limit=limit, after=after)
        return page([event_object(r) for r in rows], more)


@router.get("/{job_id}/checkpoints", response_model=ListObject)
def list_checkpoints(job_id: str, caller: Reader, db: Db, after: str | None = None,
                     limit: int = Query(10, ge=1, le=100)) -> ListObject:
    with db.session() as session:
        job = _job(session, caller, job_id)
        rows, more = event_rows.list_checkpoints(session, job_id=job_id, limit=limit, after=after)
        return page([checkpoint_object(r, job) for r in rows], more)


@router.get("/{job_id}/metrics", response_model=ListObject)
def list_metrics(job_id: str, caller: Reader, db: Db,
                 after_step: int | None = Query(None, ge=0, le=2**31 - 1)) -> ListObject:
    """tuneforge: the job's metrics series (train loss, learning rate, tokens/s, validation metrics) by step."""
    with db.session() as session:
        _job(session, caller, job_id)
        return page([metric_point(r) for r in event_rows.list_metrics(session, job_id=job_id, after_step=after_step)], False)


@router.get("/{job_id}/events/stream")
def stream_events(job_id: str, request: Request, caller: Reader, db: Db, after: str | None = None,
                  last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """tuneforge: Server-Sent Events, oldest first, from `after` (or Last-Event-ID) until the job finishes;
    at most TUNEFORGE_MAX_STREAMS_PER_KEY open per API key."""
    with db.session() as session:
        _job(session, caller, job_id)
        anchor = after or last_event_id
        start = (event_rows.event_seq(session, job_id=job_id, event_id=anchor) or 0) if anchor else 0
    streams: EventStreams = request.app.state.streams
    release = streams.claim_slot(caller.key_id)
    return SlotStreamingResponse(_sse(streams, job_id, start), release=release, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(streams: EventStreams, job_id: str, seq: int) -> AsyncIterator[str]:
    # Async, so an open stream holds no thread: it sleeps until the process's poller sees news for its job.
    subscription = streams.subscribe(job_id, seq)
    try:
        while True:
            rows, status = await streams.read(job_id, after_seq=subscription.seq, limit=STREAM_BATCH)
            for row in rows:
                subscription.seq = row.seq
                yield f"id: {row.id}\nevent: fine_tuning.job.event\ndata: {event_object(row).model_dump_json()}\n\n"
            if not rows and (status is None or status in TERMINAL_STATUSES):
                yield f"event: done\ndata: {json.dumps({'status': status})}\n\n"
                return
            if len(rows) < STREAM_BATCH and not await subscription.wait(STREAM_KEEPALIVE_SECONDS):
                yield ": keep-alive\n\n"
    finally:
        streams.unsubscribe(subscription)
