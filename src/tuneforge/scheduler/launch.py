"""What every executor prepares: the job directory, with file ids swapped for local paths.

The command itself (one process, or torchrun) is tuneforge.launch.commands.recipe_command, shared with
`tuneforge train`; the exit codes are the job-directory contract's (spec/jobdir.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tuneforge.spec.evals import EvalRunSpec
from tuneforge.spec.graders import ModelGrader
from tuneforge.spec.job import ExportRunSpec, JobSpec
from tuneforge.spec.reinforcement import RolloutSpec
from tuneforge.spec.jobdir import write_spec

RECIPE_LOG = "recipe.log"


def materialize_spec(spec: JobSpec, file_paths: dict[str, Path], model_paths: dict[str, Path] | None = None,
                     *, base_model: str | None = None) -> JobSpec:
    """The spec as the recipe reads it: file ids and registered model ids (reward and judge models, the
    model an eval run evaluates or an export job exports) swapped for local paths, and the base model for
    the one the registry materialized (a built-in name, or a directory) when the job continues training a registered model."""
    local = spec.model_copy(deep=True)
    if base_model is not None:
        local.model.base_model = base_model
    if spec.method != "export":  # an export reads no data (dataset.path is NO_DATASET)
        local.dataset.path = str(file_paths[spec.dataset.path])
    if spec.dataset.validation_path:
        local.dataset.validation_path = str(file_paths[spec.dataset.validation_path])
    if model_paths:
        _swap_models(local, {model_id: str(path) for model_id, path in model_paths.items()})
    return local


def _swap_models(node: Any, paths: dict[str, str]) -> None:
    if isinstance(node, ModelGrader) and node.model in paths:
        node.model = paths[node.model]
    if isinstance(node, RolloutSpec) and node.reward_model in paths:
        node.reward_model = paths[node.reward_model]
    if isinstance(node, EvalRunSpec) and node.model in paths:
        node.model = paths[node.model]
    if isinstance(node, ExportRunSpec) and node.model in paths:
        node.model = paths[node.model]
    children = ([getattr(node, name) for name in type(node).model_fields] if isinstance(node, BaseModel)
                else list(node.values()) if isinstance(node, dict) else list(node) if isinstance(node, list) else [])
    for child in children:
        _swap_models(child, paths)


def prepare_job_dir(job_dir: Path, spec: JobSpec) -> None:
    """The job directory with its spec.json, written at the first attempt and never again (a later
    attempt finds the same spec; another one raises spec.jobdir.SpecChanged, an OSError)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, spec)
