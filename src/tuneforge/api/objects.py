"""Response objects built from database rows: the only place rows become API shapes, so no ORM object
and no server path ever leaves the API."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy.orm import object_session

from tuneforge.scheduler.cost import cost_object, estimated_finish

from tuneforge.registry.models import fine_tuned_model_id
from tuneforge.db.tables import (
    Eval, EvalOutputItem, EvalRun, File, FineTunedModel, Job, JobCheckpoint, JobEvent, JobMetric,
)
from tuneforge.spec.evals import (
    RUN_STATUS,
    CriterionResult,
    CustomDataSourceConfig,
    DataSourceConfigObject,
    EvalApiError,
    EvalObject,
    EvalRunResult,
    OutputItemObject,
    ResultCounts,
    RunObject,
)
from tuneforge.spec.api import (
    CheckpointMetrics,
    DatasetReport,
    FileObject,
    FineTuningJob,
    HyperparametersOut,
    JobCheckpoint as CheckpointObject,
    JobError,
    JobEvent as EventObject,
    JobExtension,
    ListObject,
    MetricPoint,
    ModelObject,
)
from tuneforge.spec.job import JobSpec, TrainingSpec
from tuneforge.spec.openai_jobs import hyperparameters_of, method_of


def file_object(row: File) -> FileObject:
    return FileObject(
        id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename, purpose=row.purpose,
        status=row.status, status_details=row.status_details,
    )


def dataset_report(row: File) -> DatasetReport:
    if row.status == "uploaded":  # the scheduler has not validated it yet: an empty report
        return DatasetReport(file_id=row.id, status=row.status, valid=False, summary=f"{row.filename}: not validated yet")
    return DatasetReport.model_validate({**row.report, "file_id": row.id, "status": row.status})


def job_object(row: Job) -> FineTuningJob:
    spec = _spec_as_run(row)
    cost = _cost(row)
    return FineTuningJob(
        id=row.id, created_at=row.created_at, finished_at=row.finished_at, model=row.model,
        fine_tuned_model=row.fine_tuned_model, organization_id=row.tenant_id, status=row.status,
        validation_file=row.validation_file, training_file=row.training_file,
        hyperparameters=HyperparametersOut(**hyperparameters_of(spec)), trained_tokens=row.trained_tokens,
        error=JobError(**row.error) if row.error else None, seed=spec.training.seed, method=method_of(spec),
        metadata=row.metadata_, user_provided_suffix=row.suffix,
        tuneforge=JobExtension(spec=spec.model_dump(mode="json"), attempt=row.attempt, priority=row.priority,
                               gpu_seconds=round(row.gpu_seconds or 0.0, 3), started_at=row.started_at,
                               restarts=row.restarts or 0, cost=cost),
        estimated_finish=estimated_finish(row, cost) if cost is not None else None,
    )


def _cost(row: Job):
    """The job's cost object (scheduler/cost.py), read in the session the row came from."""
    session = object_session(row)
    return cost_object(session, row) if session is not None else None


def _spec_as_run(row: Job) -> JobSpec:
    """The submitted spec (file ids), with the training numbers the recipe resolved once it has run.

    Only the training section is taken from the resolved spec: the rest of it names this server's
    paths (dataset.path is a local file there), which no response may show."""
    spec = JobSpec.model_validate(row.spec)
    training = (row.resolved_spec or {}).get("training")
    if not isinstance(training, dict):
        return spec
    try:
        return spec.model_copy(update={"training": TrainingSpec.model_validate(training)})
    except ValidationError:  # a resolved spec this version cannot read: show what was submitted
        return spec


def event_object(row: JobEvent) -> EventObject:
    return EventObject(id=row.id, created_at=row.created_at, level=row.level, message=row.message,
                       type=row.type if row.type in ("message", "metrics") else "message", data=row.data)


def checkpoint_object(row: JobCheckpoint, job: Job) -> CheckpointObject:
    metrics = {k: v for k, v in (row.metrics or {}).items() if k != "step" and (isinstance(v, (int, float)) or v is None)}
    return CheckpointObject(
        id=row.id, created_at=row.created_at, fine_tuning_job_id=job.id, step_number=row.step,
        fine_tuned_model_checkpoint=f"{fine_tuned_model_id(job)}:ckpt-step-{row.step}",
        metrics=CheckpointMetrics(step=row.step, **metrics),
    )


def metric_point(row: JobMetric) -> MetricPoint:
    return MetricPoint(step=row.step, created_at=row.created_at, values=row.values)


def model_object(row: FineTunedModel) -> ModelObject:
    return ModelObject(id=row.id, created=row.created_at, owned_by=row.tenant_id)


def page(items: list, has_more: bool) -> ListObject:
    first = getattr(items[0], "id", None) if items else None
    last = getattr(items[-1], "id", None) if items else None
    return ListObject(data=items, has_more=has_more, first_id=first, last_id=last)


# ---- evals (spec/evals.py) ------------------------------------------------------------------------


def eval_object(row: Eval) -> EvalObject:
    config = CustomDataSourceConfig.model_validate(row.data_source_config)
    return EvalObject(id=row.id, created_at=row.created_at, name=row.name, metadata=row.metadata_,
                      data_source_config=DataSourceConfigObject(schema=config.schema_object()),
                      testing_criteria=row.testing_criteria)


def run_object(run: EvalRun, job: Job) -> RunObject:
    """The run as OpenAI shows it; its status and error are its job's. Until it completes its counts are
    zero (the items are counted by the recipe). Its job's cost (estimate, then usage) is a tuneforge extension."""
    result = EvalRunResult.model_validate(run.result) if run.result else None
    criteria = [c.get("name", "") for c in (job.spec.get("eval_run") or {}).get("testing_criteria", [])]
    error = None
    if job.error:
        message = str(job.error.get("message", "")).removeprefix("training failed: ")
        error = EvalApiError(code=str(job.error.get("code") or "failed"), message=message)
    usage = [u.model_copy(update={"model_name": run.model or u.model_name})
             for u in (result.per_model_usage if result else [])]
    cost = _cost(job)
    return RunObject(
        id=run.id, eval_id=run.eval_id, created_at=run.created_at, name=run.name, model=run.model,
        status=RUN_STATUS[job.status], data_source=run.data_source, metadata=run.metadata_, error=error,
        result_counts=result.result_counts if result else ResultCounts(),
        per_testing_criteria_results=result.per_testing_criteria_results if result else
        [CriterionResult(testing_criteria=name) for name in criteria],
        per_model_usage=usage, report_url=None,
        tuneforge={"job_id": job.id, "gpu_seconds": round(job.gpu_seconds or 0.0, 3), "started_at": job.started_at,
                   "finished_at": job.finished_at, "cost": cost.model_dump(mode="json") if cost else None},
    )


def output_item_object(row: EvalOutputItem, run: EvalRun) -> OutputItemObject:
    # The recipe names a registered model by its local directory; users see the id they asked for.
    sample = {**row.sample, "model": run.model} if run.model else row.sample
    return OutputItemObject(id=row.id, created_at=row.created_at, eval_id=run.eval_id, run_id=run.id, status=row.status,
                            datasource_item_id=row.datasource_item_id, datasource_item=row.datasource_item,
                            results=row.results, sample=sample)
