"""/v1/evals in OpenAI's Evals shape: evals (an item schema and graders), their runs (each a scheduled job,
method eval: quotas, priorities, leases and cost apply as to training) and the runs' output items."""

from __future__ import annotations

import json
from typing import Literal, NamedTuple

from fastapi import APIRouter, Query
from pydantic import TypeAdapter, ValidationError

from tuneforge.api.auth import Principal
from tuneforge.api.dependencies import Caller, Config, Db, Store
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import eval_object, output_item_object, page, run_object
from tuneforge.db import dataset_versions as dataset_rows
from tuneforge.db import evals as eval_rows
from tuneforge.db import files as file_rows
from tuneforge.db import models as model_rows
from tuneforge.db import quotas
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.session import Database
from tuneforge.db.tables import DatasetVersion
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.dataset_versions import DatasetError, pin_references
from tuneforge.scheduler import cost, states
from tuneforge.scheduler.admission import capacity_problem, live_inventories
from tuneforge.scheduler.cost import LocalJudge
from tuneforge.scheduler.submission import QuotaExceeded, judge_endpoint_refusal, submit_job
from tuneforge.spec.api import ACTIVE_STATUSES, ListObject
from tuneforge.spec.datasets import DATASET_REFERENCE
from tuneforge.spec.evals import (
    RUN_STATUS,
    CompletionsDataSource,
    CustomDataSourceConfig,
    EvalCreateRequest,
    EvalDeleted,
    EvalObject,
    EvalUpdateRequest,
    FileContentSource,
    JsonlDataSource,
    OutputItemObject,
    RunCreateRequest,
    RunDeleted,
    RunObject,
    TemplateDataError,
    eval_run_spec,
    item_problems,
    referenced_messages,
    render_item_template,
)
from tuneforge.spec.graders import Grader, ModelGrader, MultiGrader, SamplingParams
from tuneforge.spec.job import BUILTIN_BASE_MODELS, JobSpec
from tuneforge.spec.loader import format_validation_error
from tuneforge.spec.openai_jobs import REGISTERED_MODEL
from tuneforge.settings import Settings

router = APIRouter(prefix="/v1/evals", tags=["evals"])
INLINE_FILENAME = "eval-run-items.jsonl"
Order = Literal["asc", "desc"]
CRITERIA = TypeAdapter(list[Grader])


def _model_of_caller(session, caller: Principal, model: str, param: str):
    """A built-in model (None), or the caller's registered model row; anything else is a 400."""
    if model in BUILTIN_BASE_MODELS:
        return None
    if not REGISTERED_MODEL.match(model):
        raise ApiError(400, f"{param}: {model!r} is neither a built-in model ({', '.join(BUILTIN_BASE_MODELS)}) nor "
                            "one of your fine-tuned models (ft:...); a request cannot name a directory",
                       param=param, code="model_not_found")
    row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=model)
    if row is None:
        raise ApiError(400, f"{param}: no model with id {model!r}", param=param, code="model_not_found")
    return row


def _check_judges(session, caller: Principal, criteria: list, config: Settings) -> list[LocalJudge]:
    """Every judge is a model the caller may load here, or a model served by an endpoint the operator
    configured whose host the egress rules allow (the request names the endpoint, never a URL). Returns the
    judges a run serves itself, for its cost estimate."""
    local = []
    for index, grader in enumerate(criteria):
        subs = grader.graders.items() if isinstance(grader, MultiGrader) else [(None, grader)]
        for name, sub in subs:
            if isinstance(sub, ModelGrader):
                where = f"testing_criteria[{index}]" + (f".graders.{name}" if name else "")
                if sub.endpoint is None:
                    registered = _model_of_caller(session, caller, sub.model, where + ".model")
                    local.append(LocalJudge(
                        sub.name, registered.base_model if registered is not None else sub.model,
                        sum(len(m.content) for m in sub.input),
                        (sub.sampling_params or SamplingParams()).judge_max_tokens()))
                elif problem := judge_endpoint_refusal(sub.endpoint, config):
                    raise ApiError(400, f"{where}.endpoint: {problem}", param=where + ".endpoint",
                                   code="judge_endpoint_refused")
    return local


def _eval(session, caller: Principal, eval_id: str):
    row = eval_rows.get_eval(session, tenant_id=caller.tenant_id, eval_id=eval_id)
    if row is None:
        raise not_found("eval", eval_id, param="eval_id")
    return row


@router.post("", response_model=EvalObject)
def create_eval(body: EvalCreateRequest, caller: Caller, db: Db, config: Config) -> EvalObject:
    with db.session() as session:
        _check_judges(session, caller, body.testing_criteria, config)
        row = eval_rows.create_eval(
            session, tenant_id=caller.tenant_id, name=body.name or "", metadata=body.metadata,
            data_source_config=body.data_source_config.model_dump(mode="json", exclude_none=True),
            testing_criteria=[g.model_dump(mode="json", exclude_none=True) for g in body.testing_criteria],
        )
        return eval_object(row)


@router.get("", response_model=ListObject)
def list_evals(caller: Caller, db: Db, after: str | None = None, limit: int = Query(20, ge=1, le=100),
               order: Order = "asc", order_by: Literal["created_at", "updated_at"] = "created_at") -> ListObject:
    if order_by != "created_at":
        raise ApiError(400, "order_by: only created_at is supported (evals are not versioned by update time)",
                       param="order_by")
    with db.session() as session:
        rows, more = eval_rows.list_evals(session, tenant_id=caller.tenant_id, limit=limit, after=after, order=order)
        return page([eval_object(r) for r in rows], more)


@router.get("/{eval_id}", response_model=EvalObject)
def get_eval(eval_id: str, caller: Caller, db: Db) -> EvalObject:
    with db.session() as session:
        return eval_object(_eval(session, caller, eval_id))


@router.post("/{eval_id}", response_model=EvalObject)
def update_eval(eval_id: str, body: EvalUpdateRequest, caller: Caller, db: Db) -> EvalObject:
    with db.session() as session:
        row = eval_rows.update_eval(session, row=_eval(session, caller, eval_id), name=body.name, metadata=body.metadata)
        return eval_object(row)


@router.delete("/{eval_id}", response_model=EvalDeleted)
def delete_eval(eval_id: str, caller: Caller, db: Db) -> EvalDeleted:
    """Delete the eval and its runs; runs still going are cancelled."""
    with db.session() as session:
        row = _eval(session, caller, eval_id)
        runs, _ = eval_rows.list_runs(session, tenant_id=caller.tenant_id, eval_id=eval_id, limit=10_000,
                                      statuses=ACTIVE_STATUSES)
        for _, job in runs:
            states.cancel(session, job_id=job.id)
        eval_rows.delete_eval(session, row=row)
    return EvalDeleted(eval_id=eval_id)


# ---- runs ----------------------------------------------------------------------------------------


def _check_inline_items(source: FileContentSource, data_source, config: CustomDataSourceConfig) -> None:
    """Inline items against the eval's item schema, the input messages and (jsonl) their samples, each
    problem naming the item's index and field."""
    param = "data_source.source.content"
    for index, row in enumerate(source.content):
        problems = item_problems(config.item_schema, row.item, limit=1)
        if problems:
            raise ApiError(400, f"{param}[{index}]: does not match the eval's item_schema: {problems[0]}",
                           param=f"{param}[{index}].item", code="invalid_item")
        if isinstance(data_source, JsonlDataSource) and row.sample is None:
            raise ApiError(400, f"{param}[{index}]: a jsonl run grades the samples its items carry, and this one has "
                                "none; add a sample or use a completions data source", param=f"{param}[{index}].sample",
                           code="invalid_item")
        if isinstance(data_source, CompletionsDataSource):
            inputs = data_source.input_messages
            try:
                if inputs.type == "template":
                    for message in inputs.template:
                        render_item_template(message.content, row.item, index)
                else:
                    referenced_messages(row.item, inputs.item_reference, index)
            except TemplateDataError as exc:
                raise ApiError(400, f"{param}[{index}]: {exc}", param=f"{param}[{index}].item",
                               code="invalid_item") from None


def _inline_body(source: FileContentSource) -> bytes:
    """The inline items as the JSONL file they are stored as."""
    return "".join(json.dumps(row.model_dump(mode="json", exclude_none=True), ensure_ascii=False) + "\n"
                   for row in source.content).encode()


def _store_inline_items(session, store: LocalArtifactStore, caller: Principal, source: FileContentSource,
                        max_bytes: int) -> str:
    """The inline items as an uploaded file (purpose evals), through the content-addressed store and the
    scheduler's validation like any upload; returns its file id. Under the tenant's lock, within its
    storage quota."""
    body = _inline_body(source)
    tenant_rows.lock_tenant(session, tenant_id=caller.tenant_id)
    tenant = tenant_rows.get_tenant(session, tenant_id=caller.tenant_id)
    if tenant is not None and tenant.max_storage_bytes is not None and \
            quotas.stored_bytes(session, tenant_id=caller.tenant_id) + len(body) > tenant.max_storage_bytes:
        raise ApiError(413, f"data_source.source: storing these items would pass tenant {caller.tenant_id!r}'s storage "
                            "quota (max_storage_bytes); delete files or ask an admin to raise it",
                       param="data_source.source", code="storage_quota_exceeded")
    writer = store.open_staging(max_bytes=max_bytes, name=INLINE_FILENAME, tenant_id=caller.tenant_id)
    try:
        writer.write(body)
        staged = writer.finish()
        store.commit(staged, session=session)  # the blob before the row: a row never names bytes that are not there
    finally:
        writer.discard()
    row = file_rows.create_file(session, tenant_id=caller.tenant_id, filename=INLINE_FILENAME, purpose="evals",
                                size=staged.size, sha256=staged.sha256, report={}, status=file_rows.UPLOADED,
                                status_details=None)
    return row.id


def _items_file(session, caller: Principal, file_id: str):
    row = file_rows.get_file(session, tenant_id=caller.tenant_id, file_id=file_id)
    param = "data_source.source.id"
    if row is None:
        raise ApiError(400, f"{param}: no file with id {file_id!r}", param=param, code="file_not_found")
    if row.purpose != "evals":
        raise ApiError(400, f"{param}: file {file_id} has purpose {row.purpose!r}; eval items are uploaded with "
                            "purpose 'evals'", param=param, code="invalid_file")
    if row.status == file_rows.ERROR:
        raise ApiError(400, f"{param}: file {file_id} is not a valid eval data file: {row.status_details}",
                       param=param, code="invalid_file")
    return row


class Items(NamedTuple):
    """A run's items as its request names them: the stored file (None: inline items, stored with the run),
    the dataset version a reference named, and how many items of how many characters (0 items: not counted
    yet, the file is still being validated)."""
    file_id: str | None
    version: DatasetVersion | None
    count: int
    characters: int


def _items(session, caller: Principal, source) -> Items:
    """A file_id source's file, or a dataset:NAME@vN / dataset:NAME:ALIAS reference pinned to the file its
    version holds now (a moved alias never changes what a created run grades); or the inline items."""
    if isinstance(source, FileContentSource):
        return Items(None, None, len(source.content), len(_inline_body(source)))
    param = "data_source.source.id"
    try:
        version = pin_references(session, tenant_id=caller.tenant_id, fields={param: source.id}).get(param)
    except DatasetError as exc:
        raise ApiError(400, exc.message, param=param, code=exc.code) from None
    row = _items_file(session, caller, version.file_id if version is not None else source.id)
    counted = int((row.report or {}).get("examples") or 0) if row.status == file_rows.PROCESSED else 0
    return Items(row.id, version, counted, row.bytes)


def _run_spec(eval_row, data_source, base_model: str | None, file_id: str) -> JobSpec:
    """The run's job: method eval on the items file; the model's base (a jsonl run loads no model)."""
    section = eval_run_spec(eval_id=eval_row.id, data_source=data_source, testing_criteria=eval_row.testing_criteria,
                            item_schema=eval_row.data_source_config["item_schema"])
    try:
        return JobSpec.model_validate({"method": "eval", "model": {"base_model": base_model} if base_model else {},
                                       "dataset": {"path": file_id}, "eval_run": section.model_dump(mode="json")})
    except ValidationError as exc:
        raise ApiError(400, format_validation_error(exc, source="data_source"), param="data_source") from None


@router.post("/{eval_id}/runs", response_model=RunObject)
def create_run(eval_id: str, body: RunCreateRequest, caller: Caller, db: Db, store: Store, config: Config) -> RunObject:
    """Schedule a run: the model answers every item (completions), or the items' own samples are graded
    (jsonl); then every testing criterion grades each answer."""
    source, data_source = body.data_source.source, body.data_source
    with db.read_session() as session:
        eval_row = _eval(session, caller, eval_id)
        item_config = CustomDataSourceConfig.model_validate(eval_row.data_source_config)
        model_name = data_source.model if isinstance(data_source, CompletionsDataSource) else None
        registered = _model_of_caller(session, caller, model_name, "data_source.model") if model_name else None
        # the judges may be gone since the eval was created
        judges = _check_judges(session, caller, CRITERIA.validate_python(eval_row.testing_criteria), config)
        if isinstance(source, FileContentSource):
            _check_inline_items(source, data_source, item_config)
        items = _items(session, caller, source)
        inventories = live_inventories(session)
    base_model = registered.base_model if registered is not None else model_name
    probe = _run_spec(eval_row, data_source, base_model, "file-pending")
    # Only whether a worker can ever hold it: the memory planner plans training, which a run does not do.
    if problem := capacity_problem(probe, inventories):
        raise ApiError(400, problem, param=None, code="insufficient_capacity")
    estimate = cost.estimate_eval_run(tenant_id=caller.tenant_id, spec=probe, inventories=inventories,
                                      items=items.count, characters=items.characters, judges=judges)
    try:
        with db.session() as session:
            file_id = items.file_id or _store_inline_items(session, store, caller, source, config.max_upload_bytes)
            spec = probe.model_copy(update={"dataset": probe.dataset.model_copy(update={"path": file_id})})
            job = submit_job(session, tenant_id=caller.tenant_id, spec=spec, model=model_name or "",
                             training_file=file_id, validation_file=None, suffix=None, metadata=None,
                             idempotency_key=None, request_hash=None, estimate=estimate)
            shown = data_source.model_dump(mode="json", exclude_none=True)
            shown["source"] = {"type": "file_id", "id": file_id}  # inline items are stored as a file
            if (version := items.version) is not None:  # what the reference named, recorded as a job's dataset
                shown["source"]["dataset"] = f"{DATASET_REFERENCE}{version.name}@v{version.version}"
                dataset_rows.record_job_dataset(session, job_id=job.id, role="training", version_id=version.id)
            run = eval_rows.create_run(session, tenant_id=caller.tenant_id, eval_id=eval_id, job_id=job.id,
                                       name=body.name or "", model=model_name, data_source=shown, metadata=body.metadata)
            return run_object(run, job)
    except QuotaExceeded as exc:
        raise ApiError(429, exc.problem.message, param=exc.problem.param, code=exc.problem.code,
                       type="rate_limit_error") from None


def _status_filter(status: str | None) -> tuple[str, ...] | None:
    if status is None:
        return None
    return tuple(job_status for job_status, run_status in RUN_STATUS.items() if run_status == status)


@router.get("/{eval_id}/runs", response_model=ListObject)
def list_runs(eval_id: str, caller: Caller, db: Db, after: str | None = None, limit: int = Query(20, ge=1, le=100),
              order: Order = "asc",
              status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None) -> ListObject:
    with db.session() as session:
        _eval(session, caller, eval_id)
        rows, more = eval_rows.list_runs(session, tenant_id=caller.tenant_id, eval_id=eval_id, limit=limit, after=after,
                                         order=order, statuses=_status_filter(status))
        return page([run_object(run, job) for run, job in rows], more)


def _run(session, caller: Principal, eval_id: str, run_id: str):
    _eval(session, caller, eval_id)
    found = eval_rows.get_run(session, tenant_id=caller.tenant_id, eval_id=eval_id, run_id=run_id)
    if found is None:
        raise not_found("eval run", run_id, param="run_id")
    return found


@router.get("/{eval_id}/runs/{run_id}", response_model=RunObject)
def get_run(eval_id: str, run_id: str, caller: Caller, db: Db) -> RunObject:
    with db.session() as session:
        return run_object(*_run(session, caller, eval_id, run_id))


def _cancel(db: Database, caller: Principal, eval_id: str, run_id: str) -> RunObject:
    with db.session() as session:
        run, job = _run(session, caller, eval_id, run_id)
        if not states.cancel(session, job_id=job.id):
            raise ApiError(409, f"run {run_id} is {RUN_STATUS[job.status]}; only queued or in_progress runs can be "
                                "canceled", param="run_id", code="invalid_run_state")
    with db.session() as session:
        return run_object(*_run(session, caller, eval_id, run_id))


@router.post("/{eval_id}/runs/{run_id}", response_model=RunObject)
def cancel_run(eval_id: str, run_id: str, caller: Caller, db: Db) -> RunObject:
    """Cancel a queued or running run (OpenAI's documented path; the client posts to .../cancel)."""
    return _cancel(db, caller, eval_id, run_id)


@router.post("/{eval_id}/runs/{run_id}/cancel", response_model=RunObject)
def cancel_run_client_path(eval_id: str, run_id: str, caller: Caller, db: Db) -> RunObject:
    return _cancel(db, caller, eval_id, run_id)


@router.delete("/{eval_id}/runs/{run_id}", response_model=RunDeleted)
def delete_run(eval_id: str, run_id: str, caller: Caller, db: Db) -> RunDeleted:
    """Delete the run (cancelling it first when it is still going)."""
    with db.session() as session:
        run, job = _run(session, caller, eval_id, run_id)
        states.cancel(session, job_id=job.id)
        eval_rows.delete_run(session, row=run)
    return RunDeleted(run_id=run_id)


@router.get("/{eval_id}/runs/{run_id}/output_items", response_model=ListObject)
def list_output_items(eval_id: str, run_id: str, caller: Caller, db: Db, after: str | None = None,
                      limit: int = Query(20, ge=1, le=100), order: Order = "asc",
                      status: Literal["pass", "fail", "error"] | None = None) -> ListObject:
    """The graded items of a completed run, in item order (none before it completes)."""
    with db.session() as session:
        run, _ = _run(session, caller, eval_id, run_id)
        rows, more = eval_rows.list_output_items(session, run_id=run.id, limit=limit, after=after, order=order,
                                                 status=status)
        return page([output_item_object(r, run) for r in rows], more)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}", response_model=OutputItemObject)
def get_output_item(eval_id: str, run_id: str, output_item_id: str, caller: Caller, db: Db) -> OutputItemObject:
    with db.session() as session:
        run, _ = _run(session, caller, eval_id, run_id)
        row = eval_rows.get_output_item(session, run_id=run.id, item_id=output_item_id)
        if row is None:
            raise not_found("output item", output_item_id, param="output_item_id")
        return output_item_object(row, run)

