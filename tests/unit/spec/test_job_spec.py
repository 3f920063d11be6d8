from pathlib import Path

import pytest

from tuneforge.spec import JobSpec, SpecError, load_job_spec, validate_job_spec
from tuneforge.spec.hyperparameters import resolve_hyperparameters
from tuneforge.spec.reference import iter_fields

REPO = Path(__file__).resolve().parents[3]
# configs/sweeps/ holds sweep specs, not job specs (tests/unit/spec/test_sweep.py validates them).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.relative_to(REPO / "configs").parts)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates_and_documents_its_command(config):
    spec = load_job_spec(config)
    assert isinstance(spec, JobSpec)
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# tuneforge ") and str(config.relative_to(REPO)) in first_line


def test_shipped_configs_exist():
    names = {str(p.relative_to(REPO)) for p in CONFIGS}
    assert {"configs/sft/smollm2-135m-lora.yaml", "configs/smoke.yaml"} <= names


def test_defaults_follow_the_issue():
    spec = validate_job_spec({"dataset": {"path": "d.jsonl"}})
    assert spec.model.base_model == "smollm2-135m-instruct"
    assert spec.dataset.max_seq_length == 2048 and spec.dataset.train_split == 0.95
    assert (spec.adapter.type, spec.adapter.rank, spec.adapter.alpha, spec.adapter.dropout) == ("lora", 16, 32, 0.05)
    assert spec.adapter.target_modules == "all-linear"
    assert spec.training.warmup_ratio == 0.03
    assert spec.training.max_grad_norm == 1.0 and spec.training.optimizer == "adamw"
    resolved = resolve_hyperparameters(spec, 320, micro_batch=4)
    assert resolved.training.learning_rate == 2e-4  # the LoRA default
    assert (resolved.training.batch_size, resolved.training.per_device_batch_size,
            resolved.training.gradient_accumulation_steps, resolved.training.num_epochs) == (8, 4, 2, 3.0)


def test_every_field_has_a_description():
    fields = list(iter_fields())
    assert len(fields) > 40
    missing = [name for name, _, _, description in fields if not description]
    assert missing == []


def test_unknown_key_names_field_line_and_suggestion(tmp_path):
    path = write(tmp_path, "dataset:\n  path: d.jsonl\ntraining:\n  learnin_rate: 0.1\n")
    with pytest.raises(SpecError) as err:
        load_job_spec(path)
    message = str(err.value)
    assert f"{path}:4: training.learnin_rate: unknown field; did you mean 'learning_rate'?" in message


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, "dataset:\n  path: d.jsonl\ntraining:\n  learning_rate: fast\n")
    with pytest.raises(SpecError, match=r"job.yaml:4: training.learning_rate: expected a valid number.*got 'fast'"):
        load_job_spec(path)


def test_bad_literal_lists_the_choices(tmp_path):
    path = write(tmp_path, "dataset:\n  path: d.jsonl\nadapter:\n  type: prefix\n")
    with pytest.raises(SpecError, match=r"adapter.type: expected 'lora', 'qlora' or 'full', got 'prefix'"):
        load_job_spec(path)


def test_missing_dataset_is_reported(tmp_path):
    with pytest.raises(SpecError, match="dataset: required field is missing"):
        load_job_spec(write(tmp_path, "training:\n  seed: 1\n"))


def test_malformed_yaml_gives_line_and_column(tmp_path):
    path = write(tmp_path, "dataset:\n  path: [unclosed\n")
    with pytest.raises(SpecError, match=r"job.yaml:\d+:\d+: malformed YAML"):
        load_job_spec(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(SpecError, match="no such job spec file"):
        load_job_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_job_spec(write(tmp_path, "- a\n- b\n"))


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "dataset:\n  path: d.jsonl\n")
    spec = load_job_spec(
        path, ["training.learning_rate=1e-4", "adapter.target_modules=[q_proj, v_proj]", "training.max_steps=7",
               "training.max_grad_norm=null"]
    )
    assert spec.training.learning_rate == 1e-4
    assert spec.adapter.target_modules == ["q_proj", "v_proj"]
    assert spec.training.max_steps == 7 and spec.training.max_grad_norm is None


def test_bad_override_is_blamed_on_the_command_line(tmp_path):
    path = write(tmp_path, "dataset:\n  path: d.jsonl\n")
    with pytest.raises(SpecError, match=r"\(command-line override\): training.seed: expected a valid integer"):
        load_job_spec(path, ["training.seed=abc"])
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        load_job_spec(path, ["training.seed"])


def test_qlora_means_a_4bit_base_and_full_forbids_quantization():
    spec = validate_job_spec({"dataset": {"path": "d"}, "adapter": {"type": "qlora"}})
    assert spec.model.quantization == "nf4"
    with pytest.raises(SpecError, match="cannot use a quantized base"):
        validate_job_spec({"dataset": {"path": "d"}, "adapter": {"type": "full"}, "model": {"quantization": "nf4"}})
    with pytest.raises(SpecError, match="needs a 4-bit base"):
        validate_job_spec({"dataset": {"path": "d"}, "adapter": {"type": "qlora"}, "model": {"quantization": "int8"}})
    with pytest.raises(SpecError, match="int8 cannot train under resources.strategy fsdp"):
        validate_job_spec({"dataset": {"path": "d"}, "model": {"quantization": "int8"},
                           "resources": {"num_gpus": 2, "strategy": "fsdp"}})


def test_spec_round_trips_through_json():
    spec = validate_job_spec({"dataset": {"path": "d"}, "training": {"max_steps": 3}})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_each_method_names_the_data_and_metrics_it_takes():
    from tuneforge.spec.job import JobSpec

    def problem(**fields) -> str:
        with pytest.raises(ValueError) as caught:
            JobSpec.model_validate({"dataset": {"path": "d.jsonl", **fields.pop("dataset", {})}, **fields})
        return str(caught.value)

    grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}
    rollout = {"graders": [grader]}
    assert "preference records" in problem(method="dpo", dataset={"format": "chat"})
    assert "prompt or chat records" in problem(method="grpo", rollout=rollout, dataset={"format": "preference"})
    assert "prompt" in problem(method="sft", dataset={"format": "prompt"})
    assert "evaluation.metrics" in problem(method="grpo", rollout=rollout, evaluation={"metrics": ["exact_match"]})
    assert "rollout.graders" in problem(method="ppo", rollout=rollout, evaluation={"graders": [grader]})
    assert "reward_accuracy" in problem(method="reward", evaluation={"metrics": ["perplexity"]})
    assert "token_accuracy" in problem(method="dpo", evaluation={"metrics": ["token_accuracy"]})
    assert "precomputed" in problem(method="dpo", adapter={"type": "full"}, dpo={"reference": "adapter_disabled"})
    # What each method does take.
    JobSpec.model_validate({"method": "reward", "dataset": {"path": "d", "format": "preference"},
                            "evaluation": {"metrics": ["loss"]}})
    JobSpec.model_validate({"method": "grpo", "dataset": {"path": "d", "format": "prompt"}, "rollout": rollout})
    JobSpec.model_validate({"method": "dpo", "dataset": {"path": "d"}, "evaluation": {"metrics": ["loss", "rouge1"]}})
