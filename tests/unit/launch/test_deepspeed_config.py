"""DeepSpeed configs from the job spec, users' own configs, and the refusal when DeepSpeed is missing."""

from __future__ import annotations

import json

import pytest

from tuneforge.launch import deepspeed as ds
from tuneforge.spec import validate_job_spec


def spec(tmp_path, **resources):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    return validate_job_spec({
        "dataset": {"path": str(data)},
        "training": {"batch_size": 16, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                     "precision": "bf16", "max_grad_norm": 0.5},
        "resources": {"num_gpus": 4, "strategy": "deepspeed", **resources},
    })


@pytest.mark.parametrize("stage,offload", [(2, False), (2, True), (3, False), (3, True)])
def test_generated_configs_carry_the_spec_and_pass_deepspeeds_own_validation(tmp_path, stage, offload):
    pytest.importorskip("deepspeed")
    job = spec(tmp_path, deepspeed_stage=stage, cpu_offload=offload)
    config = ds.config_for(job)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (16, 2, 2)
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload
    assert ("offload_param" in zero) == (offload and stage == 3)
    ds.check_config(config, world_size=4)  # DeepSpeedConfig accepts it
    with pytest.raises(ds.DeepSpeedConfigError, match="must equal"):
        ds.check_config(config, world_size=2)


def test_a_users_config_has_its_auto_values_filled_and_its_mistakes_named(tmp_path):
    pytest.importorskip("deepspeed")
    own = tmp_path / "zero3.json"
    own.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                               "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9},
                               "bf16": {"enabled": "auto"}}))
    config = ds.config_for(spec(tmp_path, deepspeed_config=str(own)))
    assert config["train_batch_size"] == 16 and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 1e9
    ds.check_config(config, world_size=4)

    cases = {
        '{"train_batch_size": 32}': "train_batch_size is 32 but the job spec gives 16",
        '{"zero_optimisation": {"stage": 3}}': "unknown key(s) zero_optimisation",
        '{"optimizer": {"type": "Adam"}}': "remove 'optimizer' and 'scheduler'",
        '{"zero_optimization": {"stage": 3,\n "stage3_bogus": 1}}': "stage3_bogus",
        '{"zero_optimization": {"stage": 1}}': "stage 2 or 3",
        '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "tpu"}}}': "tpu",
        '{"zero_optimization": \n}': "line 2 column 1",
    }
    for text, expected in cases.items():
        own.write_text(text)
        with pytest.raises(ds.DeepSpeedConfigError) as caught:
            ds.check_config(ds.config_for(spec(tmp_path, deepspeed_config=str(own))), world_size=4, source=str(own))
        assert expected in str(caught.value) and "zero3.json" in str(caught.value), (text, str(caught.value))


def test_without_deepspeed_the_cli_refuses_the_job_before_it_starts(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from tuneforge import cli

    monkeypatch.setattr(ds, "deepspeed_installed", lambda: False)
    assert "not installed" in ds.deepspeed_problem(spec(tmp_path))
    job = tmp_path / "job.yaml"
    example = __import__("conftest").EXAMPLE_DATA / "train.jsonl"
    job.write_text(f"model: {{base_model: {tiny_model_dir}}}\ndataset: {{path: {example}}}\n"
                   "resources: {num_gpus: 2, strategy: deepspeed}\n")
    code = cli.main(["train", str(job), "--job-dir", str(tmp_path / "out")])
    assert code == 2
    assert "pip install 'tuneforge[deepspeed]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused at submission: nothing was started or written
