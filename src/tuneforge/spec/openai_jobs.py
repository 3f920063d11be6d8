"""Map an OpenAI fine-tuning job request onto a JobSpec, with errors that name the request parameter.

The OpenAI fields set what they mean (`model` the base model, `training_file` / `validation_file` the
data, `method.supervised.hyperparameters`, `suffix`, `seed`); "auto" or absent keeps the JobSpec default.
Everything else tuneforge can do travels in one extension field, `tuneforge`: a partial JobSpec, e.g.
{"adapter": {"type": "qlora", "rank": 8}, "training": {"max_steps": 100}, "resources": {"num_gpus": 2}}.
A setting given both ways is an error rather than a silent choice. The spec keeps file *ids* in
dataset.path / validation_path; a worker swaps in local paths when it writes the job directory.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import ValidationError

from tuneforge.spec.api import Hyperparameters, JobCreateRequest
from tuneforge.spec.hyperparameters import LEARNING_RATES
from tuneforge.spec.job import BUILTIN_BASE_MODELS, JobSpec
from tuneforge.spec.loader import field_path, format_validation_error
EXTENSION = "tuneforge"
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512

# Extension keys that an OpenAI field owns: naming them in the extension would make two answers.
_OWNED = {
    ("method",): "method.type",
    ("name",): "suffix",
    ("model", "base_model"): "model",
    ("dataset", "path"): "training_file",
    ("dataset", "validation_path"): "validation_file",
}
# Where a JobSpec field came from, to name the request parameter in a validation error.
_PARAM_OF_FIELD = {
    ("name",): "suffix",
    ("model", "base_model"): "model",
    ("training", "seed"): "seed",
}


class RequestError(ValueError):
    """A job request that cannot become a job; param names the offending request field."""

    def __init__(self, message: str, *, param: str | None, code: str = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def job_spec_from_request(request: JobCreateRequest) -> JobSpec:
    """The JobSpec a request asks for; raises RequestError naming the parameter at fault."""
    _check_method(request)
    _check_metadata(request.metadata)
    if request.integrations:
        raise RequestError("integrations are not supported by tuneforge; leave the list empty", param="integrations")
    if request.model not in BUILTIN_BASE_MODELS:
        raise RequestError(
            f"model {request.model!r} is not available on this server; expected one of {', '.join(BUILTIN_BASE_MODELS)}",
            param="model",
            code="model_not_found",
        )
    data = copy.deepcopy(request.tuneforge or {})
    if not isinstance(data, dict):
        raise RequestError(f"{EXTENSION} must be an object (a partial job spec)", param=EXTENSION)
    for path, owner in _OWNED.items():
        if _has(data, path):
            raise RequestError(
                f"{EXTENSION}.{'.'.join(path)} is set by the request field {owner!r}; remove it from {EXTENSION}",
                param=f"{EXTENSION}.{'.'.join(path)}",
            )
    _set(data, ("model", "base_model"), request.model)
    _set(data, ("dataset", "path"), request.training_file)
    if request.validation_file:
        _set(data, ("dataset", "validation_path"), request.validation_file)
    if request.suffix is not None:
        data["name"] = request.suffix
    if request.seed is not None:
        _set_once(data, ("training", "seed"), request.seed, param="seed")
    hyper, where = _hyperparameters(request)
    multiplier = None
    if hyper is not None:
        if _given(hyper.n_epochs):
            _set_once(data, ("training", "num_epochs"), float(hyper.n_epochs), param=f"{where}.n_epochs")
        if _given(hyper.batch_size):
            # OpenAI's batch_size is the effective batch: examples per optimizer step.
            _set_once(data, ("training", "batch_size"), hyper.batch_size, param=f"{where}.batch_size")
        if _given(hyper.learning_rate_multiplier):
            if hyper.learning_rate_multiplier <= 0:
                raise RequestError("learning_rate_multiplier must be positive", param=f"{where}.learning_rate_multiplier")
            multiplier = hyper.learning_rate_multiplier
            # The rate it multiplies depends on the adapter type, known once the spec is validated.
            _set_once(data, ("training", "learning_rate"), "auto", param=f"{where}.learning_rate_multiplier")
    try:
        spec = JobSpec.model_validate(data)
        if multiplier is not None:
            spec.training.learning_rate = LEARNING_RATES[spec.adapter.type] * multiplier
        refuse_model_paths(spec)
        return spec
    except ValidationError as exc:
        first = field_path(exc.errors()[0]["loc"], JobSpec)  # without pydantic's union tags
        param = _PARAM_OF_FIELD.get(first) or f"{EXTENSION}.{'.'.join(first)}"
        if first[:2] == ("training", "seed") and request.seed is None:
            param = f"{EXTENSION}.training.seed"
        if first[:2] == ("training", "num_epochs") and hyper and _given(hyper.n_epochs):
            param = f"{where}.n_epochs"
        if first[:2] == ("training", "batch_size") and hyper and _given(hyper.batch_size):
            param = f"{where}.batch_size"
        message = format_validation_error(exc, source=EXTENSION).replace("invalid job spec\n  ", "invalid job request: ")
        raise RequestError(message, param=param) from None


REGISTERED_MODEL = re.compile(r"^ft:[A-Za-z0-9][A-Za-z0-9:._-]{0,254}$")


def refuse_model_paths(spec: JobSpec, *, prefix: str = EXTENSION) -> None:
    """Reward and judge models in a request are built-in or registered model names, never directories."""
    named = [("rollout.reward_model", spec.rollout.reward_model)]
    for i, grader in enumerate(spec.rollout.graders):
        inner = getattr(grader, "graders", None) or {}
        named += [(f"rollout.graders.{i}.model", getattr(grader, "model", None))]
        named += [(f"rollout.graders.{i}.graders.{k}.model", getattr(g, "model", None)) for k, g in inner.items()]
    for where, model in named:
        if model is not None and model not in BUILTIN_BASE_MODELS and not REGISTERED_MODEL.match(model):
            raise RequestError(f"{where}: {model!r} is neither a built-in model ({', '.join(BUILTIN_BASE_MODELS)}) "
                               "nor a registered model id (ft:...); a request cannot name a directory",
                               param=f"{prefix}.{where}")


def hyperparameters_of(spec: JobSpec) -> dict[str, Any]:
    """The OpenAI hyperparameters a spec amounts to: "auto" until the recipe resolves them (in the job
    directory's spec.json), then the numbers, as OpenAI reports them."""
    training = spec.training
    epochs, rate = training.num_epochs, training.learning_rate
    return {
        "n_epochs": epochs if epochs == "auto" else (int(epochs) if float(epochs).is_integer() else epochs),
        "batch_size": training.batch_size,
        "learning_rate_multiplier": rate if rate == "auto" else round(rate / LEARNING_RATES[spec.adapter.type], 6),
    }


def method_of(spec: JobSpec) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters_of(spec)}}


def _check_method(request: JobCreateRequest) -> None:
    method = request.method
    if method is None or method.type == "supervised":
        if method is not None and (method.dpo or method.reinforcement):
            raise RequestError("method.type is supervised: give settings in method.supervised", param="method")
        return
    raise RequestError(
        f"method.type {method.type!r} is not available yet: this server has no {method.type.upper()} recipe; "
        "use method.type 'supervised'",
        param="method.type",
        code="unsupported_method",
    )


def _hyperparameters(request: JobCreateRequest) -> tuple[Hyperparameters | None, str]:
    nested = request.method.supervised.hyperparameters if request.method and request.method.supervised else None
    if nested is not None and request.hyperparameters is not None:
        raise RequestError(
            "hyperparameters are given twice: use method.supervised.hyperparameters only", param="hyperparameters"
        )
    if nested is not None:
        return nested, "method.supervised.hyperparameters"
    return request.hyperparameters, "hyperparameters"


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise RequestError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise RequestError(f"metadata key {key[:20]!r}...: at most {MAX_METADATA_KEY} characters", param="metadata")
        if len(value) > MAX_METADATA_VALUE:
            raise RequestError(f"metadata[{key!r}]: at most {MAX_METADATA_VALUE} characters", param="metadata")


def _given(value: Any) -> bool:
    return value is not None and value != "auto"


def _has(data: dict, path: tuple[str, ...]) -> bool:
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RequestError(f"{EXTENSION}.{part} must be an object", param=f"{EXTENSION}.{part}")
        node = child
    node[path[-1]] = value


def _set_once(data: dict, path: tuple[str, ...], value: Any, *, param: str) -> None:
    if _has(data, path):
        raise RequestError(
            f"{param} and {EXTENSION}.{'.'.join(path)} both set the same setting; give only one", param=param
        )
    _set(data, path, value)
