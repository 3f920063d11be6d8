"""Parameter counts of the presets match the published models; configs and directories load; bad input is named."""

import json

import pytest

from tuneforge.planner import PRESETS, PlannerError, arch_from_config, load_model_arch


@pytest.mark.parametrize(
    ("preset", "expected", "tolerance"),
    [
        ("llama-3-8b", 8.030e9, 0.001e9),
        ("llama-3-70b", 70.554e9, 0.001e9),
        ("mistral-7b", 7.242e9, 0.001e9),
        ("mixtral-8x7b", 46.703e9, 0.001e9),
        ("qwen2.5-7b", 7.616e9, 0.001e9),
        ("smollm2-135m", 134.515e6, 0.001e6),
    ],
)
def test_preset_parameter_counts_match_the_published_models(preset, expected, tolerance):
    assert PRESETS[preset].num_params == pytest.approx(expected, abs=tolerance)


def test_tiny_llama_preset_matches_the_model_the_engine_builds(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert PRESETS["tiny-llama"].num_params == sum(p.numel() for p in model.parameters())
    assert load_model_arch(str(tiny_model_dir)) == PRESETS["tiny-llama"].with_name(tiny_model_dir.name)


def test_mixtral_keeps_all_experts_resident_but_runs_two():
    mixtral = PRESETS["mixtral-8x7b"]
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.01)
    assert mixtral.num_params > 3.5 * mixtral.active_params


def test_jobspec_builtin_names_are_presets():
    assert load_model_arch("smollm2-135m-instruct").num_params == PRESETS["smollm2-135m"].num_params


def test_config_json_path_and_directory(tmp_path):
    config = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = load_model_arch(str(tmp_path))
    from_file = load_model_arch(str(tmp_path / "config.json"))
    # qwen2 defaults: untied embeddings and biases on q, k, v, as transformers' Qwen2Config has them.
    assert from_dir.num_params == from_file.num_params == PRESETS["qwen2.5-7b"].num_params


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("unknown", "expected a preset"),
        ("dir_without_config", "has no config.json"),
        ("not_json", "expected a JSON model config"),
        ("missing_keys", "missing num_hidden_layers"),
        ("bad_heads", "must be a multiple of"),
    ],
)
def test_bad_model_descriptions_say_what_was_expected(tmp_path, setup, message):
    target = str(tmp_path / "nope")
    if setup == "dir_without_config":
        target = str(tmp_path)
    elif setup != "unknown":
        path = tmp_path / "config.json"
        base = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4}
        if setup == "missing_keys":
            del base["num_hidden_layers"]
        if setup == "bad_heads":
            base["num_key_value_heads"] = 3
        path.write_text("{oops" if setup == "not_json" else json.dumps(base))
        target = str(path)
    with pytest.raises(PlannerError, match=message):
        load_model_arch(target)


def test_config_with_a_non_integer_size_is_refused():
    with pytest.raises(PlannerError, match="hidden_size must be a positive integer"):
        arch_from_config({"vocab_size": 10, "hidden_size": 0, "intermediate_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 1}, "broken")
