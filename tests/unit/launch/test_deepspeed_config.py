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
    own = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9}, "bf16": {"enabled": "auto"}}
    config = ds.config_for(spec(tmp_path, deepspeed_config=own))
    assert config["train_batch_size"] == 16 and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 1e9
    ds.check_config(config, world_size=4)

    cases = {
        '{"train_batch_size": 32}': "train_batch_size is 32 but the job spec gives 16",
        '{"zero_optimisation": {"stage": 3}}': "unknown or unsupported key(s) zero_optimisation",
        '{"optimizer": {"type": "Adam"}}': "remove 'optimizer' and 'scheduler'",
        '{"zero_optimization": {"stage": 3,\n "stage3_bogus": 1}}': "stage3_bogus",
        '{"zero_optimization": {"stage": 1}}': "stage 2 or 3",
        '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "tpu"}}}': "tpu",
    }
    for text, expected in cases.items():
        with pytest.raises(ds.DeepSpeedConfigError) as caught:
            ds.check_config(ds.config_for(spec(tmp_path, deepspeed_config=json.loads(text))), world_size=4,
                            source="resources.deepspeed_config")
        assert expected in str(caught.value) and "deepspeed_config" in str(caught.value), (text, str(caught.value))


@pytest.mark.parametrize("config,named", [
    ({"flops_profiler": {"enabled": True, "output_file": "/tmp/owned"}}, "flops_profiler.output_file"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "offload_param.device"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"nvme_path": "/x"}}}, "offload_optimizer.nvme_path"),
    ({"tensorboard": {"enabled": True, "output_path": "/x"}}, "tensorboard"),
    ({"csv_monitor": {"enabled": True, "output_path": "/x"}}, "csv_monitor"),
    ({"wandb": {"enabled": True}}, "wandb"),
    ({"autotuning": {"results_dir": "/x"}}, "autotuning"),
    ({"checkpoint": {"writer": {"type": "fast", "io_dir": "/x"}}}, "checkpoint.writer.io_dir"),
])
def test_keys_that_name_a_location_are_refused_without_importing_deepspeed(tmp_path, config, named):
    problem = ds.deepspeed_problem(spec(tmp_path, deepspeed_config=config), deepspeed_classes=False)
    assert problem is not None and named in problem, problem
    # Harmless keys that merely contain the letters ("profile_step", "module_depth") stay allowed.
    fine = {"flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": -1},
            "activation_checkpointing": {"profile": False}, "zero_optimization": {"stage": 3}}
    assert ds.deepspeed_problem(spec(tmp_path, deepspeed_config=fine), deepspeed_classes=False) is None


def test_a_config_path_is_read_once_by_the_job_file_loader_and_never_kept(tmp_path, monkeypatch):
    from tuneforge.spec import SpecError, load_job_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    job = tmp_path / "job.yaml"
    job.write_text("dataset: {path: train.jsonl}\nresources: {num_gpus: 2, strategy: deepspeed, deepspeed_config: zero3.json}\n")
    loaded = load_job_spec(job)
    assert loaded.resources.deepspeed_config == {"zero_optimization": {"stage": 3}}
    assert "zero3.json" not in loaded.model_dump_json()
    (tmp_path / "broken.json").write_text('{"zero_optimization": \n}')
    with pytest.raises(SpecError, match="broken.json: line 2 column 1"):
        load_job_spec(job, ["resources.deepspeed_config=broken.json"])
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_job_spec(job, ["resources.deepspeed_config=binary.json"])
    with pytest.raises(SpecError, match="cannot read it"):
        load_job_spec(job, ["resources.deepspeed_config=missing.json"])
    # A spec (what the API and spec.json carry) never takes a path.
    with pytest.raises(Exception, match="a JSON object"):
        validate_job_spec({"dataset": {"path": "x"}, "resources": {"strategy": "deepspeed", "deepspeed_config": "/etc/passwd"}})
    with pytest.raises(Exception, match="strategy is ddp"):
        validate_job_spec({"dataset": {"path": "x"}, "resources": {"deepspeed_config": {"zero_optimization": {"stage": 2}}}})


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
