"""`tuneforge train` from the outside: bad input is refused before anything is written; good input runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE_DATA, REPO, chat, write_jsonl
from tuneforge.cli import main


def run_cli(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFORGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def spec_file(tmp_path: Path, data: Path, extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"model:\n  base_model: tiny-llama\ndataset:\n  path: {data}\ntraining:\n  max_steps: 2\n{extra}")
    return path


def assert_nothing_started(home: Path) -> None:
    jobs = home / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_spec", "no such job spec file"),
        ("malformed_yaml", "malformed YAML"),
        ("unknown_field", "training.epochz: unknown field"),
        ("bad_data_line", "d.jsonl:3: expected a JSON object, found invalid JSON"),
        ("missing_data_field", "d.jsonl:2: messages[1].content: expected a string, found no such field"),
        ("missing_data_file", "nope.jsonl: expected an existing data file, found no such file"),
    ],
)
def test_bad_input_is_one_paragraph_exit_2_and_no_job_dir(tmp_path, tuneforge_home, capsys, case, expected):
    records = [chat(f"q{i}", f"a{i}") for i in range(12)]
    data = tmp_path / "d.jsonl"
    if case == "bad_data_line":
        records[2] = '{"messages": [oops'
    if case == "missing_data_field":
        records[1] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
    write_jsonl(data, records)
    spec = spec_file(tmp_path, tmp_path / "nope.jsonl" if case == "missing_data_file" else data)
    if case == "missing_spec":
        spec = tmp_path / "absent.yaml"
    if case == "malformed_yaml":
        spec.write_text("training: [1, 2\n")
    if case == "unknown_field":
        spec.write_text(spec.read_text().replace("max_steps: 2", "epochz: 2"))

    code = main(["train", str(spec), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert_nothing_started(tuneforge_home)


def test_smoke_config_runs_end_to_end_from_the_command_line(tmp_path, tuneforge_home):
    job_dir = tmp_path / "smoke-job"
    result = run_cli("train", "configs/smoke.yaml", "--job-dir", job_dir, "training.max_steps=12", home=tuneforge_home)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "evaluation on" in result.stdout and "fine-tuned" in result.stdout  # the report's table
    assert any(line.split()[:1] == ["loss"] for line in result.stdout.splitlines())
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval"]["fine_tuned"]["loss"] < summary["eval"]["base"]["loss"]
    spec = json.loads((job_dir / "spec.json").read_text())
    assert spec["training"]["max_steps"] == 12  # the override is in the submitted spec
    assert spec["dataset"]["path"] == str(EXAMPLE_DATA / "train.jsonl")  # paths resolved
    # The built-in tiny model was materialized in this TUNEFORGE_HOME's model cache.
    assert (tuneforge_home / "models" / "tiny-llama" / "config.json").is_file()
    # A finished job directory is not reused.
    again = run_cli("train", "configs/smoke.yaml", "--job-dir", job_dir, home=tuneforge_home)
    assert again.returncode == 2 and "finished job" in again.stderr


def test_a_failing_job_exits_1_and_leaves_no_summary(tmp_path, tuneforge_home):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    spec = spec_file(tmp_path, data, "checkpoint:\n  max_restarts: 0\n")
    job_dir = tmp_path / "job"
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "TUNEFORGE_FAULT_INJECTION": "crash_at_step=1"}
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(spec), "--job-dir", str(job_dir)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 1 and "InjectedCrash: injected crash after step 1" in result.stderr
    assert not (job_dir / "summary.json").exists()
    last = json.loads((job_dir / "events.jsonl").read_text().splitlines()[-1])
    assert last["level"] == "error" and last["data"]["status"] == "failed" and last["data"]["retryable"]


def test_a_job_the_hardware_cannot_run_exits_2_without_retries(tmp_path, tuneforge_home):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    spec = spec_file(tmp_path, data, "  precision: fp16\n")  # under training:
    job_dir = tmp_path / "job"
    result = run_cli("train", spec, "--job-dir", job_dir, home=tuneforge_home)
    assert result.returncode == 2 and "fp16 needs a GPU" in result.stderr
    assert "restarting" not in result.stderr and "Traceback" not in result.stderr
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert [e["data"].get("kind") for e in events].count("restart") == 0
    assert events[-1]["data"]["retryable"] is False


def test_spec_reference_lists_every_field(capsys):
    assert main(["spec"]) == 0
    out = capsys.readouterr().out
    assert "training.learning_rate = 'auto'" in out and "adapter.rank = 16" in out


def test_a_job_that_cannot_fit_its_gpu_is_refused_before_it_starts(tmp_path, tuneforge_home, capsys):
    """The memory planner reads the model's config.json (no weights needed) and refuses what cannot fit."""
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}))
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)])
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model:\n  base_model: {model}\ndataset:\n  path: {data}\nadapter:\n  type: full\n"
                    "resources:\n  gpu_type: a100-80gb\n")
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "does not fit resources.gpu_type a100-80gb" in err and "options:" in err
    assert_nothing_started(tuneforge_home)
