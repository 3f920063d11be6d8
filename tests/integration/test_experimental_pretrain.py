"""A second method on the recipe runtime: continued pre-training on raw text (recipes/experimental/pretrain.py),
run as its own module on the tiny model. It writes no contract code of its own, so a crash, a resume, bad
input and the job directory must behave exactly as for the SFT recipe."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, chat, make_job_dir, write_jsonl
from tuneforge.engine.events import read_events
from tuneforge.spec.jobdir import read_summary

MODULE = "tuneforge.recipes.experimental.pretrain"


def pretrain(job_dir, home, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_FAULT_INJECTION": faults}
    return subprocess.run([sys.executable, "-m", MODULE, "--job-dir", str(job_dir), "--no-progress"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def text_job(tmp_path, model_dir, records):
    data = write_jsonl(tmp_path / "corpus.jsonl", records)
    return make_job_dir(tmp_path, model_dir, dataset={"path": str(data), "validation_path": None, "train_split": 0.8,
                                                      "max_seq_length": 64},
                        training={"max_steps": 8, "per_device_batch_size": 4, "learning_rate": 3e-3},
                        evaluation={"metrics": ["loss"]}, checkpoint={"every_steps": 4, "max_restarts": 0})


@pytest.mark.slow  # an experimental recipe: opt-in, like its use
def test_continued_pretraining_learns_resumes_after_a_crash_and_writes_the_job_directory(tmp_path, tiny_model_dir,
                                                                                          tuneforge_home):
    documents = [{"text": f"Record {i}: the quick brown fox jumps over the lazy dog {i % 7} times."} for i in range(60)]
    job_dir = text_job(tmp_path, tiny_model_dir, documents)
    submitted = (job_dir / "spec.json").read_bytes()

    crashed = pretrain(job_dir, tuneforge_home, "crash_at_step=6")
    assert crashed.returncode == 1, crashed.stderr
    failure = list(read_events(job_dir))[-1]
    assert failure["data"]["status"] == "failed" and failure["data"]["retryable"] is True
    assert "InjectedCrash" in failure["data"]["error"]

    done = pretrain(job_dir, tuneforge_home)
    assert done.returncode == 0, done.stderr
    events = list(read_events(job_dir))
    assert [e["data"]["step"] for e in events if e["data"].get("kind") == "resumed"] == [4]
    losses = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]

    summary = read_summary(job_dir)
    assert summary.method == "continued_pretraining" and summary.steps == 8 and summary.output == "adapter"
    assert summary.eval.fine_tuned.loss is not None and summary.eval.fine_tuned.perplexity is not None
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (job_dir / "spec.json").read_bytes() == submitted
    resolved = json.loads((job_dir / "resolved_spec.json").read_text())["training"]
    assert resolved["packing"] is False and resolved["precision"] == "fp32" and resolved["per_device_batch_size"] == 4
    assert resolved["batch_size"] == 8 and resolved["gradient_accumulation_steps"] == 2


def test_chat_data_is_bad_input_exit_2(tmp_path, tiny_model_dir, tuneforge_home):
    job_dir = text_job(tmp_path, tiny_model_dir, [chat(f"q{i}", f"a{i}") for i in range(12)])
    result = pretrain(job_dir, tuneforge_home)
    assert result.returncode == 2 and "needs text data" in result.stderr and "Traceback" not in result.stderr
    assert list(read_events(job_dir))[-1]["data"]["retryable"] is False
