"""deploy: of a finished job (export/deploy.py): where the export went, or why it failed without failing the job."""

from test_server_rules import make_adapter
from tuneforge.export.deploy import run_deploy
from tuneforge.spec import validate_job_spec


def job_with_adapter(tmp_path, base, deploy, **lora):
    job = tmp_path / "job"
    job.mkdir()
    make_adapter(job, base, name="adapter", **lora)
    spec = validate_job_spec({"name": "bot", "model": {"base_model": str(base)}, "dataset": {"path": "d.jsonl"},
                              "adapter": {"rank": 8}, "deploy": deploy})
    return job, spec


def test_deploy_writes_the_gguf_export_and_says_where(tmp_path, tiny_model_dir):
    job, spec = job_with_adapter(tmp_path, tiny_model_dir, {"target": "llama.cpp", "gguf_type": "q8_0"},
                                 init_lora_weights=False)
    notes = []
    deployment = run_deploy(job, spec, "adapter", lambda message, **data: notes.append((message, data)))
    assert deployment.status == "succeeded" and deployment.format == "gguf" and deployment.path == "export"
    assert (job / "export" / "bot-Q8_0.gguf").is_file() and (job / "export" / "Modelfile").is_file()
    assert deployment.command.startswith(f"llama-server -m {job / 'export' / 'bot-Q8_0.gguf'}")
    assert [data["status"] for _, data in notes] == ["running", "succeeded"]


def test_a_failed_deploy_is_recorded_and_leaves_no_export(tmp_path, tiny_model_dir):
    job, spec = job_with_adapter(tmp_path, tiny_model_dir, {"target": "vllm"}, bias="all")
    notes = []
    deployment = run_deploy(job, spec, "adapter", lambda message, **data: notes.append((message, data)))
    assert deployment.status == "failed" and "bias: bias is 'all'" in deployment.error
    assert notes[-1][1]["level"] == "error" and notes[-1][1]["kind"] == "deploy"
    assert not (job / "export").exists() and (job / "adapter" / "adapter_config.json").is_file()


def test_no_target_no_export(tmp_path, tiny_model_dir):
    job, spec = job_with_adapter(tmp_path, tiny_model_dir, {"target": "none"})
    assert run_deploy(job, spec, "adapter", lambda *a, **k: None) is None and not (job / "export").exists()
