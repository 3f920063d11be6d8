"""What every executor launches: the recipe command for a job, its environment, and its job directory.

The recipe is chosen from a closed table by the spec's method (never an import path from a user), and
runs under torchrun when a job has several processes. The job directory gets a spec.json in which the
file ids of the stored spec are replaced by the artifact store's local paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.spec.job import JobSpec
from tuneforge.spec.jobdir import write_spec

RECIPES = {"sft": "tuneforge.recipes.sft"}
EXIT_OK = 0
EXIT_PREEMPTED = 75  # the recipe stopped on SIGTERM after writing a checkpoint: resumable
RECIPE_LOG = "recipe.log"


def recipe_args(spec: JobSpec, job_dir: str | Path) -> list[str]:
    return ["-m", RECIPES[spec.method], "--job-dir", str(job_dir), "--no-progress"]


def recipe_command(spec: JobSpec, job_dir: str | Path, *, python: str = sys.executable, nproc_per_node: int = 1) -> list[str]:
    if nproc_per_node > 1:
        return [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", *recipe_args(spec, job_dir)]
    return [python, *recipe_args(spec, job_dir)]


def materialize_spec(spec: JobSpec, file_paths: dict[str, Path]) -> JobSpec:
    """The spec as the recipe reads it: file ids swapped for local paths."""
    local = spec.model_copy(deep=True)
    local.dataset.path = str(file_paths[spec.dataset.path])
    if spec.dataset.validation_path:
        local.dataset.validation_path = str(file_paths[spec.dataset.validation_path])
    return local


def prepare_job_dir(job_dir: Path, spec: JobSpec) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, spec)
