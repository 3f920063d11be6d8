"""A version's lineage: everything that made it, read once from the job row and the job directory when the
job succeeds, so a result can be traced and reproduced after the job directory is gone.

Base model (and the version it resolved to), dataset files with their SHA-256 (and dataset version), the
resolved JobSpec, the job id, the summary's metrics and the evaluation report's headline rows, tenant, time,
the library versions the recipe recorded (environment.json), the seed and the chat template's hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.db import files as file_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db.identifiers import now
from tuneforge.db.tables import Job
from tuneforge.registry.checkpoints import parse_checkpoint_id
from tuneforge.registry.dataset_versions import lineage_dataset
from tuneforge.spec.job import BUILTIN_BASE_MODELS
from tuneforge.spec.jobdir import ENVIRONMENT_FILE, read_report, read_resolved_spec, read_summary

MAX_REPORT_ROWS = 50


def base_model_record(session: Session, *, tenant_id: str, base_model: str) -> dict[str, Any]:
    """What a job's (pinned) model.base_model was: a built-in model, a registered base model, a version, or a
    kept checkpoint of a version's job (its step, and that version)."""
    if base_model in BUILTIN_BASE_MODELS:
        return {"ref": base_model, "kind": "builtin"}
    registered = version_rows.get_base_model(session, name=base_model)
    if registered is not None:
        return {"ref": base_model, "kind": "registered", "manifest_sha256": registered.manifest_sha256}
    if (checkpoint := parse_checkpoint_id(base_model)) is not None:  # a kept checkpoint of a version's job
        version = version_rows.version_of_model(session, tenant_id=tenant_id, model_id=checkpoint[0])
        return {"ref": base_model, "kind": "checkpoint", "model": checkpoint[0], "step": checkpoint[1],
                **({"name": version.name, "version": version.version, "manifest_sha256": version.manifest_sha256}
                   if version is not None else {})}
    version = version_rows.version_of_model(session, tenant_id=tenant_id, model_id=base_model)
    if version is not None:
        return {"ref": base_model, "kind": "version", "name": version.name, "version": version.version,
                "manifest_sha256": version.manifest_sha256}
    return {"ref": base_model, "kind": "model"}  # a fine-tuned model registered before versions existed


def chat_template_sha256(output: Path) -> str | None:
    """The digest of the chat template the output's tokenizer carries (a .jinja file or tokenizer_config's)."""
    jinja = output / "chat_template.jinja"
    if jinja.is_file():
        return hashlib.sha256(jinja.read_bytes()).hexdigest()
    try:
        template = json.loads((output / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):  # named templates: hash them in a stable order
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _metrics(job_dir: Path) -> dict[str, Any]:
    try:
        summary = read_summary(job_dir)
    except ValueError:
        return {}
    if summary is None:
        return {}
    metrics = summary.scalars()
    metrics["eval"] = summary.eval.model_dump(mode="json", exclude_none=True, exclude={"base": {"samples"},
                                                                                      "fine_tuned": {"samples"}})
    if summary.best_checkpoint is not None:
        metrics["best_checkpoint"] = summary.best_checkpoint.model_dump(mode="json")
    return metrics


def _evaluation(job_dir: Path) -> dict[str, Any] | None:
    try:
        report = read_report(job_dir)
    except ValueError:
        return None
    if report is None:
        return None
    return report.model_dump(mode="json", exclude={"samples"}) | {
        "rows": [row.model_dump(mode="json") for row in report.rows[:MAX_REPORT_ROWS]]}


def without_server_paths(resolved: Any, submitted: Any) -> Any:
    """The resolved spec as users may see it: where the worker put a local path (the data's blob, a
    materialized model, the merged base), the id the job was submitted with."""
    if isinstance(resolved, dict):
        return {key: without_server_paths(value, submitted.get(key) if isinstance(submitted, dict) else None)
                for key, value in resolved.items()}
    if isinstance(resolved, list):
        return [without_server_paths(value, submitted[i] if isinstance(submitted, list) and i < len(submitted) else None)
                for i, value in enumerate(resolved)]
    if isinstance(resolved, str) and resolved.startswith("/"):
        return submitted if isinstance(submitted, str) and not submitted.startswith("/") else "<server path>"
    return resolved


def job_lineage(session: Session, *, job: Job, job_dir: Path, output: Path) -> dict[str, Any]:
    """The lineage of what job wrote to output."""
    spec = job.spec or {}
    resolved = read_resolved_spec(job_dir) or job.resolved_spec or {}
    dataset = spec.get("dataset") or {}
    file_ids = [fid for fid in (dataset.get("path"), dataset.get("validation_path")) if fid]
    rows = file_rows.files_by_id(session, file_ids=file_ids)
    # A file registered as a dataset version when the job was created names that version too (issue 13).
    datasets = [{"role": role, "file_id": fid, "filename": rows[fid].filename if fid in rows else None,
                 "sha256": rows[fid].sha256 if fid in rows else None, "bytes": rows[fid].bytes if fid in rows else None,
                 **lineage_dataset(session, job=job, role=role, file_id=fid)}
                for role, fid in zip(("training", "validation"), file_ids)]
    training = resolved.get("training") or spec.get("training") or {}
    return {
        "job_id": job.id,
        "tenant": job.tenant_id,
        "created_at": now(),
        "base_model": base_model_record(session, tenant_id=job.tenant_id,
                                        base_model=(spec.get("model") or {}).get("base_model") or job.model),
        "datasets": datasets,
        "method": spec.get("method"),
        "resolved_spec": without_server_paths(resolved, spec),
        "seed": training.get("seed"),
        "chat_template_sha256": chat_template_sha256(output),
        "libraries": _read_json(job_dir / ENVIRONMENT_FILE),
        "metrics": without_server_paths(_metrics(job_dir), {"base_model": spec.get("model", {}).get("base_model")}),
        "evaluation": without_server_paths(_evaluation(job_dir), None),
    }
