"""Admission: what is checked between a job request and the queue.

At creation (synchronously, before the job row exists): can any live worker ever hold the resources the
job asks for? After creation (validating_files): are its files valid training data? A job whose files
are not fails with the line-level report in its error; one whose files are goes to the queue; one whose
files the scheduler has not validated yet waits in validating_files until it has.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from tuneforge.db import files as file_rows
from tuneforge.db import workers as worker_rows
from tuneforge.db.tables import File, Job
from tuneforge.launch.capabilities import offered
from tuneforge.launch.deepspeed import INSTALL_HINT
from tuneforge.registry.datasets import MIN_TRAINING_EXAMPLES
from tuneforge.scheduler import states
from tuneforge.scheduler.placement import JobRequest, Node, could_ever_fit
from tuneforge.spec.api import DatasetReport
from tuneforge.spec.job import METHOD_FORMATS, JobSpec

WORKER_SEEN_WITHIN_S = 600.0


def request_of(spec: JobSpec, *, job_id: str = "", tenant_id: str = "") -> JobRequest:
    resources = spec.resources
    return JobRequest(
        job_id=job_id, tenant_id=tenant_id, gpus_per_node=resources.num_gpus, num_nodes=resources.num_nodes,
        gpu_type=resources.gpu_type, priority=resources.priority,
    )


def live_inventories(session: Session) -> list[dict[str, Any]]:
    """[{worker, executor, nodes: [{gpu_type, gpus}]}] for workers seen recently."""
    return [
        {"worker": w.id, "executor": w.executor, "nodes": list(w.inventory)}
        for w in worker_rows.live_workers(session, seen_within_s=WORKER_SEEN_WITHIN_S)
    ]


def strategy_problem(spec: JobSpec, inventories: list[dict[str, Any]]) -> str | None:
    """Why no live worker can run this job's strategy (workers report theirs); None when one can, when no
    worker is known yet, or when a worker does not say (it predates the report)."""
    reports = [offered(node) for inventory in inventories for node in inventory["nodes"]]
    if not reports or any(report is None for report in reports):
        return None
    wanted = spec.resources.strategy
    if any(wanted in report for report in reports):
        return None
    have = sorted({s for report in reports for s in report})
    hint = f" ({INSTALL_HINT})" if wanted == "deepspeed" else ""
    return (f"no live worker can run resources.strategy {wanted}{hint}; the workers offer "
            f"{', '.join(have) or 'nothing'}")


def capacity_problem(spec: JobSpec, inventories: list[dict[str, Any]]) -> str | None:
    """Why no live worker could ever run this job; None when one could, or when no worker is known yet
    (a job may wait for a worker to join)."""
    if not inventories:
        return None
    request = request_of(spec)
    for inventory in inventories:
        if could_ever_fit(request, [Node(n["gpu_type"], n["gpus"]) for n in inventory["nodes"]]):
            return None
    nodes = sorted({f"{n['gpus']} x {n['gpu_type']}" for inv in inventories for n in inv["nodes"]})
    wanted = f"{request.num_nodes} node(s) with {request.gpus_per_node} GPU(s) of type {request.gpu_type}"
    return f"no worker can ever run this job: it asks for {wanted}; the workers' nodes have {', '.join(nodes)}"


def shared_storage_problem(spec: JobSpec, inventories: list[dict[str, Any]]) -> str | None:
    """Why a job on several nodes cannot run on the live workers that could hold it: none of them has its
    job root on storage every node sees. None for one node, when no worker is known or could hold it (the
    capacity check speaks then), or when a worker does not say (it predates the report)."""
    if spec.resources.num_nodes == 1:
        return None
    request = request_of(spec)
    holders = [inventory for inventory in inventories
               if could_ever_fit(request, [Node(n["gpu_type"], n["gpus"]) for n in inventory["nodes"]])]
    said = [[node.get("shared_job_root") for node in inventory["nodes"]] for inventory in holders]
    if not holders or any(None in answers or all(answers) for answers in said):
        return None
    executors = sorted({inventory["executor"] for inventory in holders})
    return (f"resources.num_nodes is {spec.resources.num_nodes}, but no worker that could run it has its job "
            f"directories on storage every node sees (executor {', '.join(executors)}): every rank writes its "
            "checkpoint shards there. Mount one folder at TUNEFORGE_HOME/jobs on every node and set "
            "TUNEFORGE_SHARED_JOB_ROOT=1 for the worker, or use the kubernetes executor with a ReadWriteMany PVC")


def file_problem(spec: JobSpec, training: File | None, validation: File | None) -> dict[str, Any] | None:
    """The job error ({code, message, param}) its files call for, or None when they are usable."""
    if spec.method == "export":  # an export job reads no data
        return None
    if training is None or training.deleted_at is not None:
        return {"code": "invalid_training_file", "param": "training_file", "message": "the training file was deleted"}
    report = DatasetReport.model_validate(training.report)
    if spec.method == "eval":  # an eval run's items: any number of valid eval items (purpose evals)
        if training.purpose != "evals" or not report.valid:
            return {"code": "invalid_file", "param": "data_source.source",
                    "message": f"file {training.id} ({training.filename}) is not a valid eval data file:\n{report.summary}"}
        return None
    if not report.valid:
        return {"code": "invalid_training_file", "param": "training_file",
                "message": f"training file {training.id} is not valid training data:\n{report.summary}"}
    if report.examples < MIN_TRAINING_EXAMPLES:
        return {"code": "invalid_training_file", "param": "training_file",
                "message": f"training file {training.id} ({training.filename}) has {report.examples} examples; "
                           f"at least {MIN_TRAINING_EXAMPLES} are needed"}
    wanted = spec.dataset.format
    formats = METHOD_FORMATS.get(spec.method)
    if formats is not None and report.format not in formats:
        return {"code": "invalid_training_file", "param": "training_file",
                "message": f"method {spec.method} trains on {' or '.join(formats)} records, but training file "
                           f"{training.id} ({training.filename}) holds {report.format} records"}
    if wanted != "auto" and wanted != report.format:
        return {"code": "invalid_training_file", "param": "training_file",
                "message": f"training file {training.id} ({training.filename}) holds {report.format} records, "
                           f"but tuneforge.dataset.format is {wanted}"}
    if spec.dataset.validation_path:
        if validation is None or validation.deleted_at is not None:
            return {"code": "invalid_validation_file", "param": "validation_file", "message": "the validation file was deleted"}
        val_report = DatasetReport.model_validate(validation.report)
        if not val_report.valid:
            return {"code": "invalid_validation_file", "param": "validation_file",
                    "message": f"validation file {validation.id} is not valid data:\n{val_report.summary}"}
        if val_report.format != report.format:
            return {"code": "invalid_validation_file", "param": "validation_file",
                    "message": f"validation file {validation.id} ({validation.filename}) holds {val_report.format} "
                               f"records but the training file holds {report.format} records"}
    return None


def admit_job(session: Session, *, job: Job) -> bool:
    """validating_files -> queued or failed, from the reports the scheduler stored with the files.

    While a live file of the job is still "uploaded" the job stays in validating_files and this returns
    False: the scheduler's validator admits it once that file is validated (and the reaper retries)."""
    spec = JobSpec.model_validate(job.spec)
    ids = [spec.dataset.path] + ([spec.dataset.validation_path] if spec.dataset.validation_path else [])
    found = file_rows.files_by_id(session, file_ids=ids)
    training = found.get(spec.dataset.path)
    validation = found.get(spec.dataset.validation_path) if spec.dataset.validation_path else None
    if any(f is not None and f.deleted_at is None and f.status == file_rows.UPLOADED for f in (training, validation)):
        return False
    return states.admit(session, job_id=job.id, error=file_problem(spec, training, validation))


def memory_plan(spec: JobSpec, inventories: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The per-GPU memory plan of a job from the planner (torch-free), with its host RAM need per node
    ("host_memory"); None for a model it cannot describe. Only local workers alive: the job runs on this
    machine, whose RAM it is checked against."""
    from tuneforge.planner import PlannerError, plan_job
    from tuneforge.planner.host_memory import job_host_memory

    try:
        plan = plan_job(spec)
    except PlannerError:
        return None
    local = bool(inventories) and all(inventory["executor"] == "local" for inventory in inventories)
    return {**plan.to_dict(), "host_memory": job_host_memory(spec, plan, local_machine=local).to_dict()}


def host_memory_problem(plan: dict[str, Any] | None) -> str | None:
    """Why the job's nodes do not have the host RAM it needs (loading the model, or what it keeps there)."""
    host = (plan or {}).get("host_memory")
    if host is None or host["fits"]:
        return None
    advice = ("set resources.model_loading to auto with fsdp or deepspeed stage 3 (each rank reads only its shard), "
              "or " if not host["sharded_load"] and host["load_per_rank"] >= host["train_per_rank"] else "")
    return (host["reason"][0].upper() + host["reason"][1:] + f". Options: {advice}more nodes or processes, "
            "or a node with more RAM (resources.host_memory_gb).")


def memory_problem(plan: dict[str, Any] | None) -> str | None:
    """Why the job cannot fit the GPUs it asks for, with what would make it fit; None when it fits."""
    if plan is None or plan["fits"]:
        return None
    advice = "; ".join(plan.get("recommendations", [])[:3])
    return plan["reason"] + (f" Options: {advice}." if advice else "")
