"""Fine-tuned models: naming and registering what a succeeded job produced, and the built-in base models."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from sqlalchemy.orm import Session

from tuneforge.db import models as model_rows
from tuneforge.db.tables import FineTunedModel, Job
from tuneforge.spec.job import BUILTIN_BASE_MODELS

BASE_MODEL_OWNER = "tuneforge"
log = logging.getLogger("tuneforge.registry")


def fine_tuned_model_id(job: Job) -> str:
    """OpenAI's shape, ft:BASE:ORG:SUFFIX:ID, with the job's id as the unique part."""
    return f"ft:{job.model}:{job.tenant_id}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')}"


def register_job_output(session: Session, *, job: Job, job_dir: Path, home: Path, output: str) -> FineTunedModel:
    """Record the adapter (or full model) a job wrote as a model of the job's tenant."""
    location = os.path.relpath(job_dir / output, home)
    return model_rows.create_model(
        session, model_id=fine_tuned_model_id(job), tenant_id=job.tenant_id, job_id=job.id, base_model=job.model,
        kind="model" if output == "model" else "adapter", location=location,
    )


def remove_model_files(*, location: str, home: Path) -> bool:
    """Remove what a deleted model leaves on disk: its adapter (or model) directory and the checkpoints
    of the job that made it. Only ever inside TUNEFORGE_HOME's jobs, whatever the row says."""
    jobs = (home / "jobs").resolve()
    output = (home / location).resolve()
    if not output.is_relative_to(jobs) or output.parent == jobs:
        log.error("not removing the files of a model at %r: outside TUNEFORGE_HOME's jobs", location)
        return False
    for path in (output, output.parent / "checkpoints"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    return True


def base_models() -> tuple[str, ...]:
    return BUILTIN_BASE_MODELS
