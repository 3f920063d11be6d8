"""Job specification schemas (pydantic); no torch, no database."""

from tuneforge.spec.job import (
    AdapterSpec,
    CheckpointSpec,
    DatasetSpec,
    DeploySpec,
    EvaluationSpec,
    JobSpec,
    ModelSpec,
    ResourcesSpec,
    TrainingSpec,
)
from tuneforge.spec.loader import SpecError, load_job_spec, validate_job_spec

__all__ = [
    "AdapterSpec",
    "CheckpointSpec",
    "DatasetSpec",
    "DeploySpec",
    "EvaluationSpec",
    "JobSpec",
    "ModelSpec",
    "ResourcesSpec",
    "SpecError",
    "TrainingSpec",
    "load_job_spec",
    "validate_job_spec",
]
