"""OpenAI job requests become JobSpecs: hyperparameters and "auto", the extension field, and errors that name
the request parameter."""

from __future__ import annotations

import pytest

from tuneforge.spec.api import JobCreateRequest
from tuneforge.spec.hyperparameters import LEARNING_RATES, default_learning_rate
from tuneforge.spec.openai_jobs import RequestError, hyperparameters_of, job_spec_from_request, method_of


def spec_of(**fields):
    return job_spec_from_request(JobCreateRequest(**{"model": "tiny-llama", "training_file": "file-1", **fields}))


def error_of(**fields) -> RequestError:
    with pytest.raises(RequestError) as caught:
        spec_of(**fields)
    return caught.value


def test_openai_fields_map_onto_the_spec_and_auto_keeps_defaults():
    spec = spec_of(validation_file="file-2", suffix="my-model", seed=9,
                   method={"type": "supervised", "supervised": {"hyperparameters": {
                       "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}})
    assert spec.model.base_model == "tiny-llama" and spec.dataset.path == "file-1"
    assert spec.dataset.validation_path == "file-2" and spec.name == "my-model" and spec.training.seed == 9
    assert spec.training.num_epochs == 2 and spec.training.batch_size == "auto"  # resolved by the recipe
    assert spec.training.learning_rate == pytest.approx(LEARNING_RATES["lora"] / 2)
    grpo = spec_of(method={"type": "reinforcement", "reinforcement": {"grader": {
        "type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"},
        "hyperparameters": {"learning_rate_multiplier": 2}}})
    assert grpo.training.learning_rate == pytest.approx(2 * default_learning_rate("grpo", "lora")) == pytest.approx(1e-4)
    assert hyperparameters_of(spec) == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
    full = spec_of(tuneforge={"adapter": {"type": "full"}}, method={"type": "supervised", "supervised": {
        "hyperparameters": {"batch_size": 16, "learning_rate_multiplier": 2}}})
    assert full.training.learning_rate == pytest.approx(2 * LEARNING_RATES["full"])  # the multiplier of the method's rate
    assert full.training.batch_size == 16  # OpenAI's batch_size is the effective batch


def test_the_extension_carries_the_rest_of_the_spec():
    spec = spec_of(tuneforge={"adapter": {"type": "qlora", "rank": 8}, "resources": {"num_gpus": 2, "priority": 5},
                              "training": {"packing": True}})
    assert spec.adapter.type == "qlora" and spec.model.quantization == "nf4" and spec.adapter.rank == 8
    assert spec.resources.num_gpus == 2 and spec.resources.priority == 5 and spec.training.packing


GRADER = {"type": "string_check", "name": "answer", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
          "operation": "eq"}


def test_openai_methods_map_onto_tuneforge_methods_and_back():
    dpo = spec_of(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2, "batch_size": 16}}})
    assert (dpo.method, dpo.dpo.beta, dpo.training.num_epochs, dpo.training.batch_size) == ("dpo", 0.3, 2, 16)
    assert method_of(dpo) == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": "auto", "beta": 0.3}}}
    rft = spec_of(method={"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
        "compute_multiplier": 2, "eval_interval": 5, "eval_samples": 20, "reasoning_effort": "default"}}})
    assert rft.method == "grpo" and rft.rollout.graders[0].reference == "{{item.answer}}"
    assert (rft.grpo.num_generations, rft.evaluation.eval_every_steps, rft.evaluation.max_eval_examples) == (16, 5, 20)
    assert method_of(rft)["reinforcement"]["grader"] == GRADER
    ppo = spec_of(method={"type": "ppo"}, tuneforge={"rollout": {"reward_model": "ft:tiny-llama:rm:abc123"}})
    assert ppo.method == "ppo" and method_of(ppo)["type"] == "ppo"
    assert spec_of(method={"type": "reward"}).method == "reward"
    with pytest.raises(ValueError, match="reasoning_effort"):
        JobCreateRequest(model="tiny-llama", training_file="f", method={"type": "reinforcement", "reinforcement": {
            "grader": GRADER, "hyperparameters": {"reasoning_effort": "high"}}})
    assert error_of(method={"type": "reinforcement", "reinforcement": {"grader": GRADER}},
                    tuneforge={"rollout": {"graders": [GRADER]}}).param == "tuneforge.rollout.graders"


def test_errors_name_the_request_parameter():
    assert error_of(method={"type": "dpo", "supervised": {}}).param == "method.supervised"
    assert error_of(method={"type": "reinforcement"}).param == "method.reinforcement"
    assert error_of(method={"type": "ppo"}).param == "tuneforge.rollout"
    assert error_of(method={"type": "ppo"}, tuneforge={"rollout": {"reward_model": "/models/rm"}}).param == \
        "tuneforge.rollout.reward_model"
    judge = {"type": "score_model", "name": "j", "model": "/models/judge", "input": [{"role": "user", "content": "x"}]}
    assert error_of(method={"type": "ppo"}, tuneforge={"rollout": {"graders": [judge]}}).param == \
        "tuneforge.rollout.graders.0.model"
    # (a bare name like llama-9000 may be a registered base model: the jobs router asks the registry)
    assert error_of(model="Llama 9000").param == "model"
    assert error_of(tuneforge={"dataset": {"path": "/etc/passwd"}}).param == "tuneforge.dataset.path"
    assert error_of(tuneforge={"model": {"base_model": "/models/x"}}).param == "tuneforge.model.base_model"
    assert error_of(tuneforge={"method": "sft"}).param == "tuneforge.method"
    assert error_of(tuneforge={"adapter": {"rank": 0}}).param == "tuneforge.adapter.rank"
    assert error_of(suffix="bad suffix!").param == "suffix"
    assert error_of(seed=1, tuneforge={"training": {"seed": 2}}).param == "seed"
    both = error_of(hyperparameters={"n_epochs": 1}, method={"type": "supervised", "supervised": {"hyperparameters": {}}})
    assert both.param == "hyperparameters"
    assert error_of(metadata={f"k{i}": "v" for i in range(17)}).param == "metadata"
    assert error_of(integrations=[{"type": "wandb"}]).param == "integrations"
    assert "learning_rate" in str(error_of(tuneforge={"training": {"learnin_rate": 1}}))


def test_no_request_can_name_a_server_path_every_free_form_field_is_accounted_for():
    """Walk JobSpec: a field that takes free text or a free-form object could carry a path or a command
    from a request. Each one must be owned by an OpenAI field that takes an id or a registered name, be
    pattern-bounded, or be checked by content; a new one fails here until it is classified."""
    import typing

    from pydantic import BaseModel

    from tuneforge.spec.job import JobSpec
    from tuneforge.spec.openai_jobs import _OWNED

    owned = {".".join(path) for path in _OWNED}
    pattern_bounded = {"name", "adapter.target_modules"}
    checked_by_content = {"resources.deepspeed_config"}  # launch/deepspeed.py refuse_locations
    # Wherever graders sit, their templates are rendered into text and never opened, their names and
    # labels are bounded, and judge and reward models must be registered names in a request
    # (openai_jobs.refuse_model_paths walks the whole spec for them).
    grader_fields = {"input": "template", "reference": "template", "content": "template", "calculate_output": "template",
                     "model": "model name", "name": "bounded", "endpoint": "bounded", "labels": "bounded",
                     "passing_labels": "bounded"}
    checked_by_content |= {"rollout.reward_model"}
    # Evaluation options: best_by must name a measured metric or grader, the accuracy regex only ever
    # matches answers, a JSON schema's $ref may point only inside it (spec/job.py validators).
    pattern_bounded |= {"evaluation.accuracy.choices"}
    checked_by_content |= {"checkpoint.best_by", "evaluation.accuracy.regex", "evaluation.json_schema"}
    # Eval runs (method eval; a fine-tuning request cannot set eval_run): the model is a built-in or the
    # caller's registered id (api/routers/evals.py), the item schema's $ref only points inside it.
    pattern_bounded |= {"eval_run.eval_id", "eval_run.input_reference"}
    # Monitoring: the watched validation metric's name is a word (spec/monitoring.py); it is only compared.
    pattern_bounded |= {"monitoring.alerts.eval_worse.metric"}
    checked_by_content |= {"eval_run.model", "eval_run.item_schema"}
    # Export jobs (method export; made only by POST /v1/models/{id}/exports): the model is the caller's
    # registered id, swapped for its directory by the worker (openai_jobs.registered_models).
    checked_by_content |= {"export_run.model"}

    def free_form(annotation) -> bool:
        if annotation in (str, dict) or typing.get_origin(annotation) is dict:
            return True
        return any(free_form(arg) for arg in typing.get_args(annotation) if arg is not type(None))

    found = set()

    def models_in(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            nested = models_in(field.annotation)
            for sub in nested:  # sections, and the members of lists and unions of models (graders)
                walk(sub, f"{prefix}{name}.")
            if not nested and free_form(field.annotation):
                if model.__module__ == "tuneforge.spec.graders":
                    assert name in grader_fields, f"grader field {prefix}{name} is not classified"
                    continue
                found.add(prefix + name)

    walk(JobSpec, "")
    assert found <= owned | pattern_bounded | checked_by_content, found - (owned | pattern_bounded | checked_by_content)
    assert owned == {"method", "name", "model.base_model", "dataset.path", "dataset.validation_path"}


def test_a_request_cannot_point_the_base_model_or_data_at_a_path():
    base = {"model": "tiny-llama", "training_file": "file-abc"}
    for extension, param in (({"model": {"base_model": "/etc"}}, "tuneforge.model.base_model"),
                             ({"dataset": {"validation_path": "/etc/passwd"}}, "tuneforge.dataset.validation_path")):
        with pytest.raises(RequestError) as caught:
            job_spec_from_request(JobCreateRequest.model_validate({**base, "tuneforge": extension}))
        assert caught.value.param == param
    with pytest.raises(RequestError) as caught:
        job_spec_from_request(JobCreateRequest.model_validate({**base, "model": "/root/models/llama"}))
    assert caught.value.code == "model_not_found"
