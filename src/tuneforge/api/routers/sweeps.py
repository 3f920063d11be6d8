"""/v1/sweeps (tuneforge): create a hyperparameter sweep, list, retrieve (best trial, importance), its trials, cancel.

A sweep's base job names uploaded file ids (or dataset:NAME@vN / dataset:NAME:ALIAS, pinned to the file at
creation) and built-in or registered models, exactly as a job request's `tuneforge` extension does; its trials
are ordinary jobs of the caller's tenant (scheduler/sweeps.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Query

from tuneforge.api.auth import Principal
from tuneforge.api.dependencies import Db, JobsCaller, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import page
from tuneforge.db import files as file_rows
from tuneforge.db import sweeps as sweep_rows
from tuneforge.registry.dataset_versions import DatasetError, pin_references
from tuneforge.registry.models import RegistryError, resolve_base_reference
from tuneforge.registry.named_models import NamedModelError, check_named_models
from tuneforge.scheduler.admission import live_inventories
from tuneforge.scheduler.submission import check_submission
from tuneforge.scheduler.sweeps import cancel_sweep, sweep_object
from tuneforge.spec.api import ListObject
from tuneforge.spec.job import BUILTIN_BASE_MODELS
from tuneforge.spec.openai_jobs import REGISTERED_MODEL, RequestError, refuse_model_paths
from tuneforge.spec.sweep import SweepObject, SweepSpec, SweepTrialObject

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


def _pin_datasets(session, caller: Principal, spec: SweepSpec) -> SweepSpec:
    """The spec with a dataset:NAME@vN / dataset:NAME:ALIAS in base.dataset.path or validation_path replaced by
    the file id that version holds now: every trial trains on the same bytes, even if the alias moves while
    the sweep runs. Another tenant's dataset answers like a missing one."""
    dataset = spec.base.dataset
    try:
        versions = pin_references(session, tenant_id=caller.tenant_id, fields={
            "base.dataset.path": dataset.path, "base.dataset.validation_path": dataset.validation_path})
    except DatasetError as exc:
        raise ApiError(400, exc.message, param=exc.field, code=exc.code) from None
    if not versions:
        return spec
    pinned = {field.removeprefix("base.dataset."): version.file_id for field, version in versions.items()}
    base = spec.base.model_copy(update={"dataset": dataset.model_copy(update=pinned)})
    return spec.model_copy(update={"base": base})


def _check_sources(session, caller: Principal, spec: SweepSpec) -> None:
    """The data are the caller's uploads, and every model the base or a value of the space names is built in
    or the caller's own (a model, or a kept checkpoint of one: ft:...:ckpt-step-N, pinned as it is): a sweep,
    like a job, never makes the server read a path."""
    for param, file_id in (("base.dataset.path", spec.base.dataset.path),
                           ("base.dataset.validation_path", spec.base.dataset.validation_path)):
        if file_id is None:
            continue
        row = file_rows.get_file(session, tenant_id=caller.tenant_id, file_id=file_id)
        if row is None:
            raise ApiError(400, f"{param}: no file with id {file_id!r}", param=param, code="file_not_found")
        if row.purpose != "fine-tune":
            raise ApiError(400, f"{param}: file {file_id} has purpose {row.purpose!r}, expected 'fine-tune'", param=param)
    for where, job_spec in spec.edge_specs():
        base_model = job_spec.model.base_model
        if base_model not in BUILTIN_BASE_MODELS and not REGISTERED_MODEL.match(base_model):
            raise ApiError(400, f"{where}: model.base_model {base_model!r} is neither a built-in model "
                           f"({', '.join(BUILTIN_BASE_MODELS)}) nor a registered model id (ft:...)", param=where,
                           code="model_not_found")
        try:
            refuse_model_paths(job_spec, prefix=where)
        except RequestError as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
        try:  # the caller's models or their kept checkpoints (ft:...:ckpt-step-N), as a job request's are
            resolve_base_reference(session, tenant_id=caller.tenant_id, ref=base_model)
        except RegistryError as exc:
            raise ApiError(400, f"{where}: model.base_model: {exc.message}", param=where, code=exc.code) from None
        try:
            check_named_models(session, tenant_id=caller.tenant_id, spec=job_spec)
        except NamedModelError as exc:
            raise ApiError(400, f"{where}: {exc.message}", param=where, code=exc.code) from None


@router.post("", response_model=SweepObject)
def create_sweep(body: SweepSpec, caller: JobsCaller, db: Db) -> SweepObject:
    with db.read_session() as session:
        body = _pin_datasets(session, caller, body)
        _check_sources(session, caller, body)
        inventories = live_inventories(session)
    problem = check_submission(body.base, inventories).problem
    if problem:
        raise ApiError(400, f"base: {problem.message}", param=f"base.{(problem.param or '').removeprefix('tuneforge.')}",
                       code=problem.code)
    with db.session() as session:
        sweep = sweep_rows.create_sweep(session, tenant_id=caller.tenant_id, name=body.name,
                                        spec=body.model_dump(mode="json"))
    return sweep_object(db, sweep, with_importance=False)


@router.get("", response_model=ListObject)
def list_sweeps(caller: Reader, db: Db, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> ListObject:
    with db.read_session() as session:
        rows, more = sweep_rows.list_sweeps(session, tenant_id=caller.tenant_id, limit=limit, after=after)
    return page([sweep_object(db, row, with_importance=False) for row in rows], more)


def _sweep(db, caller: Principal, sweep_id: str):
    with db.read_session() as session:
        row = sweep_rows.get_sweep(session, tenant_id=caller.tenant_id, sweep_id=sweep_id)
    if row is None:
        raise not_found("sweep", sweep_id, param="sweep_id")
    return row


@router.get("/{sweep_id}", response_model=SweepObject)
def get_sweep(sweep_id: str, caller: Reader, db: Db) -> SweepObject:
    return sweep_object(db, _sweep(db, caller, sweep_id), with_importance=True)


@router.get("/{sweep_id}/trials", response_model=ListObject)
def list_trials(sweep_id: str, caller: Reader, db: Db) -> ListObject:
    sweep = _sweep(db, caller, sweep_id)
    with db.read_session() as session:
        trials = sweep_rows.trials_of(session, sweep_id=sweep.id)
    items = [SweepTrialObject(number=t.number, status=t.status, job_id=t.job_id, params=t.params, values=t.values,
                              error=t.error, created_at=t.created_at, finished_at=t.finished_at) for t in trials]
    return ListObject(data=items, has_more=False)


@router.post("/{sweep_id}/cancel", response_model=SweepObject)
def cancel(sweep_id: str, caller: JobsCaller, db: Db) -> SweepObject:
    sweep = _sweep(db, caller, sweep_id)
    if not cancel_sweep(db, sweep):
        raise ApiError(409, f"sweep {sweep_id} is {sweep.status}; only running sweeps can be cancelled",
                       param="sweep_id", code="invalid_sweep_state")
    return sweep_object(db, _sweep(db, caller, sweep_id), with_importance=False)
