"""`tuneforge plan` from the outside: a table, JSON, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from tuneforge.cli import main


def test_table_shows_breakdown_verdict_and_throughput(capsys):
    code = main(["plan", "--model", "llama-3-8b", "--method", "lora", "--gpus", "1", "--gpu", "a100-80gb",
                 "--seq-len", "2048", "--batch", "4", "--tokens", "1e9"])
    out = capsys.readouterr().out
    assert code == 0
    for expected in ("weights", "gradients", "optimizer state", "activations", "buffers", "total",
                     "verdict: Does not fit", "recommendations:", "tokens/s per GPU", "GPU-hours"):
        assert expected in out


def test_json_for_machines(capsys):
    code = main(["plan", "--model", "llama-3-70b", "--method", "full", "--gpus", "8", "--gpu", "a100-80gb",
                 "--strategy", "fsdp", "--cpu-offload", "--gradient-checkpointing", "--batch", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["fits"] is True
    assert data["setup"]["strategy"] == "fsdp_full_shard" and data["setup"]["cpu_offload"] is True
    assert data["memory_bytes"]["host_offload"] > 0
    assert data["throughput"]["tokens_per_second"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-9"], "expected a preset"),
        (["--model", "/nonexistent/config.json"], "expected a preset"),
        (["--model", "llama-3-8b", "--gpus", "0"], "--gpus: expected a positive integer, found '0'"),
        (["--model", "llama-3-8b", "--seq-len", "-5"], "--seq-len: expected a positive integer"),
        (["--model", "llama-3-8b", "--gpu", "v100"], "gpu 'v100': expected one of"),
        (["--model", "llama-3-8b", "--method", "prefix"], "method 'prefix'"),
        (["--model", "llama-3-8b", "--tokens", "lots"], "--tokens: expected a positive token count"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "plan", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_a_job_file_with_overrides_is_planned_as_train_reads_it(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {base_model: llama-3-8b}\ndataset: {path: train.jsonl, max_seq_length: 2048}\n"
                   "adapter: {type: lora, rank: 16}\nresources: {gpu_type: a100-80gb}\n"
                   "training: {per_device_batch_size: 4}\n")
    assert main(["plan", str(job), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "llama-3-8b", "--gpu", "a100-80gb", "--batch", "4", "--json"]) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_file["memory_bytes"] == from_flags["memory_bytes"]
    # Dotted overrides and shortcut flags set the same fields.
    assert main(["plan", str(job), "resources.num_gpus=8", "resources.strategy=fsdp", "--json"]) == 0
    dotted = json.loads(capsys.readouterr().out)
    assert main(["plan", str(job), "--gpus", "8", "--strategy", "fsdp", "--json"]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert dotted["setup"] == flagged["setup"] and dotted["setup"]["strategy"] == "fsdp_full_shard"
    assert dotted["memory_bytes"]["weights"] < from_file["memory_bytes"]["weights"]


def test_a_bad_job_file_names_the_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {base_model: llama-3-8b}\ndataset: {path: t.jsonl}\ntraining:\n  learnin_rate: 1e-4\n")
    assert main(["plan", str(job)]) == 2
    assert "job.yaml:4: training.learnin_rate: unknown field; did you mean 'learning_rate'?" in capsys.readouterr().err
