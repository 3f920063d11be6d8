"""Map an OpenAI fine-tuning job request onto a JobSpec, with errors that name the request parameter.

The OpenAI fields set what they mean (`model` the base model, `training_file` / `validation_file` the
data, `method` with its hyperparameters, `suffix`, `seed`); "auto" or absent keeps the JobSpec default.
OpenAI's methods map onto tuneforge's: supervised -> sft, dpo -> dpo (beta), reinforcement -> grpo (its
grader is the reward); tuneforge adds `reward` (a reward model), `ppo`, `vlm` and `clip` as method types.
Everything else tuneforge can do travels in one extension field, `tuneforge`: a partial JobSpec, e.g.
{"adapter": {"type": "qlora", "rank": 8}, "training": {"max_steps": 100}, "resources": {"num_gpus": 2}}.
A setting given both ways is an error rather than a silent choice. The spec keeps file *ids* in
dataset.path / validation_path; a worker swaps in local paths when it writes the job directory.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from tuneforge.spec.api import Hyperparameters, JobCreateRequest
from tuneforge.spec.graders import ModelGrader
from tuneforge.spec.hyperparameters import default_learning_rate
from tuneforge.spec.job import BUILTIN_BASE_MODELS, RL_METHODS, JobSpec
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
    method = _method(request)
    _check_metadata(request.metadata)
    if request.integrations:
        raise RequestError("integrations are not supported by tuneforge; leave the list empty", param="integrations")
    if request.model not in BUILTIN_BASE_MODELS and not MODEL_REFERENCE.match(request.model):
        raise RequestError(
            f"model {request.model!r} is not available on this server; expected one of {', '.join(BUILTIN_BASE_MODELS)}, "
            "a registered base model, a fine-tuned model id (ft:...) or a registry reference (NAME@vN, NAME:ALIAS)",
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
    data["method"] = method
    if method == "grpo" and request.method.reinforcement is not None:
        if _has(data, ("rollout", "graders")):
            raise RequestError("the reward is method.reinforcement.grader; remove tuneforge.rollout.graders "
                               "(several graders combine in one multi grader)", param=f"{EXTENSION}.rollout.graders")
        _set(data, ("rollout", "graders"), [request.method.reinforcement.grader.model_dump(exclude_none=True)])
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
            # OpenAI's batch_size is the effective batch: examples per optimizer step (for online RL the
            # prompts of a step, each sampled one or num_generations times).
            target = ("rollout", "prompts_per_step") if method in RL_METHODS else ("training", "batch_size")
            _set_once(data, target, hyper.batch_size, param=f"{where}.batch_size")
        _method_hyperparameters(data, hyper, method, where)
        if _given(hyper.learning_rate_multiplier):
            if hyper.learning_rate_multiplier <= 0:
                raise RequestError("learning_rate_multiplier must be positive", param=f"{where}.learning_rate_multiplier")
            multiplier = hyper.learning_rate_multiplier
            # The rate it multiplies depends on the adapter type, known once the spec is validated.
            _set_once(data, ("training", "learning_rate"), "auto", param=f"{where}.learning_rate_multiplier")
    if method in RL_METHODS and not (_has(data, ("rollout", "reward_model")) or _has(data, ("rollout", "graders"))):
        raise RequestError(f"method.type {request.method.type} needs a reward: method.reinforcement.grader, or in "
                           f"{EXTENSION}.rollout a reward_model (a registered reward model id) or graders",
                           param=f"{EXTENSION}.rollout" if method == "ppo" else "method.reinforcement")
    try:
        spec = JobSpec.model_validate(data)
        if multiplier is not None:
            spec.training.learning_rate = default_learning_rate(spec.method, spec.adapter.type) * multiplier
        refuse_model_paths(spec)
        return spec
    except ValidationError as exc:
        first = field_path(exc.errors()[0]["loc"], JobSpec)  # without pydantic's union tags
        param = _PARAM_OF_FIELD.get(first) or ".".join((EXTENSION, *first))  # a whole-spec rule: the extension
        if first[:2] == ("training", "seed") and request.seed is None:
            param = f"{EXTENSION}.training.seed"
        if first[:2] == ("training", "num_epochs") and hyper and _given(hyper.n_epochs):
            param = f"{where}.n_epochs"
        if first[:2] == ("training", "batch_size") and hyper and _given(hyper.batch_size):
            param = f"{where}.batch_size"
        message = format_validation_error(exc, source=EXTENSION).replace("invalid job spec\n  ", "invalid job request: ")
        raise RequestError(message, param=param) from None


REGISTERED_MODEL = re.compile(r"^ft:[A-Za-z0-9][A-Za-z0-9:._-]{0,254}$")
# What a job may train from besides a built-in model (the registry resolves it with the database): a
# fine-tuned model id, a registry name with a version (support-bot@v2) or an alias (support-bot:production),
# or the name of a base model an admin registered. Never a path.
MODEL_REFERENCE = re.compile(r"^(ft:[A-Za-z0-9][A-Za-z0-9:._-]{0,254}|[a-z0-9][a-z0-9-]{0,63}(@v[0-9]{1,9}|:[a-z0-9][a-z0-9-]{0,63})?)$")


def _judge_models(node: Any, where: str) -> list[tuple[str, str]]:
    """(location, model) of every judge model under node: wherever graders sit in the spec."""
    if isinstance(node, ModelGrader):
        return [(f"{where}.model", node.model)]
    if isinstance(node, BaseModel):
        return [found for name in type(node).model_fields for found in
                _judge_models(getattr(node, name), f"{where}.{name}" if where else name)]
    if isinstance(node, (list, tuple)):
        return [found for i, item in enumerate(node) for found in _judge_models(item, f"{where}.{i}")]
    if isinstance(node, dict):
        return [found for key, item in node.items() for found in _judge_models(item, f"{where}.{key}")]
    return []


def named_models(spec: JobSpec) -> list[tuple[str, str]]:
    """(where, model) of each model the spec names: as a reward or judge model, as the model an eval run
    evaluates or an export exports, or as the base model it trains from."""
    named = [("rollout.reward_model", spec.rollout.reward_model), ("eval_run.model", spec.eval_run.model),
             ("model.base_model", spec.model.base_model), ("export_run.model", spec.export_run.model),
             *_judge_models(spec, "")]
    return [(where, model) for where, model in named if model is not None]


def registered_models(spec: JobSpec) -> list[tuple[str, str]]:
    """(where, id) of each registered (ft:) model the spec names (named_models)."""
    return [(where, model) for where, model in named_models(spec) if REGISTERED_MODEL.match(model)]


def refuse_model_paths(spec: JobSpec, *, prefix: str = EXTENSION) -> None:
    """Reward, judge and exported models in a request are built-in or registered model names, never directories."""
    named = [("rollout.reward_model", spec.rollout.reward_model), ("export_run.model", spec.export_run.model),
             *_judge_models(spec, "")]
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
        "batch_size": spec.rollout.prompts_per_step if spec.method in RL_METHODS else training.batch_size,
        "learning_rate_multiplier": rate if rate == "auto" else round(rate / default_learning_rate(spec.method, spec.adapter.type), 6),
    }


# OpenAI's method types (and tuneforge's own) and the JobSpec method each one runs.
METHOD_OF_TYPE = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo", "reward": "reward", "ppo": "ppo",
                  "vlm": "vlm", "clip": "clip"}
TYPE_OF_METHOD = {method: kind for kind, method in METHOD_OF_TYPE.items()}
DEFAULT_GENERATIONS = 8  # grpo.num_generations at compute_multiplier 1


def method_of(spec: JobSpec) -> dict[str, Any]:
    """The OpenAI method object a spec amounts to, with its hyperparameters as the job reports them."""
    kind = TYPE_OF_METHOD[spec.method]
    hyperparameters = hyperparameters_of(spec)
    body: dict[str, Any] = {"hyperparameters": hyperparameters}
    if spec.method == "dpo":
        hyperparameters["beta"] = spec.dpo.beta
    if spec.method == "grpo" and len(spec.rollout.graders) == 1:
        body["grader"] = spec.rollout.graders[0].model_dump(exclude_none=True)
    return {"type": kind, kind: body}


def _method(request: JobCreateRequest) -> str:
    """The JobSpec method the request asks for; settings may only sit under the chosen type."""
    method = request.method
    if method is None:
        return "sft"
    others = [kind for kind in METHOD_OF_TYPE if kind != method.type and getattr(method, kind) is not None]
    if others:
        raise RequestError(f"method.type is {method.type}: give its settings in method.{method.type}, not in "
                           f"method.{others[0]}", param=f"method.{others[0]}")
    if method.type == "reinforcement" and method.reinforcement is None:
        raise RequestError("method.type reinforcement needs method.reinforcement.grader (the reward)",
                           param="method.reinforcement")
    return METHOD_OF_TYPE[method.type]


def _method_hyperparameters(data: dict, hyper: Hyperparameters, method: str, where: str) -> None:
    """The hyperparameters only some methods have: DPO's beta, reinforcement's sampling and evaluation."""
    if _given(getattr(hyper, "beta", None)):
        _set_once(data, ("dpo", "beta"), hyper.beta, param=f"{where}.beta")
    if _given(getattr(hyper, "compute_multiplier", None)):
        generations = min(256, max(2, round(DEFAULT_GENERATIONS * hyper.compute_multiplier)))
        _set_once(data, ("grpo", "num_generations"), generations, param=f"{where}.compute_multiplier")
    if _given(getattr(hyper, "eval_interval", None)):
        _set_once(data, ("evaluation", "eval_every_steps"), hyper.eval_interval, param=f"{where}.eval_interval")
    if _given(getattr(hyper, "eval_samples", None)):
        _set_once(data, ("evaluation", "max_eval_examples"), hyper.eval_samples, param=f"{where}.eval_samples")


def _hyperparameters(request: JobCreateRequest) -> tuple[Hyperparameters | None, str]:
    method = request.method
    body = getattr(method, method.type) if method is not None else None
    nested = body.hyperparameters if body is not None else None
    where = f"method.{method.type}.hyperparameters" if method is not None else "hyperparameters"
    if nested is not None and request.hyperparameters is not None:
        raise RequestError(f"hyperparameters are given twice: use {where} only", param="hyperparameters")
    if nested is not None:
        return nested, where
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
