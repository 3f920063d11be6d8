"""What every executor prepares: the job directory, with file ids swapped for local paths.

The command itself (one process, or torchrun) is tuneforge.launch.commands.recipe_command, shared with
`tuneforge train`; the exit codes are the job-directory contract's (spec/jobdir.py).
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.spec.job import JobSpec
from tuneforge.spec.jobdir import write_spec

RECIPE_LOG = "recipe.log"


def materialize_spec(spec: JobSpec, file_paths: dict[str, Path]) -> JobSpec:
    """The spec as the recipe reads it: file ids swapped for local paths."""
    local = spec.model_copy(deep=True)
    local.dataset.path = str(file_paths[spec.dataset.path])
    if spec.dataset.validation_path:
        local.dataset.validation_path = str(file_paths[spec.dataset.validation_path])
    return local


def prepare_job_dir(job_dir: Path, spec: JobSpec) -> None:
    """The job directory with its spec.json, written at the first attempt and never again (a later
    attempt finds the same spec; another one raises spec.jobdir.SpecChanged, an OSError)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, spec)
