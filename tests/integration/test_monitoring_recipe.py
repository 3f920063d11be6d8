"""Monitoring in a real SFT run on the tiny model (CPU): each step's event carries MFU, memory and the system
samples; the TensorBoard reporter holds the same numbers as events.jsonl; an alert with stop_job ends the job
at a checkpoint as a non-retryable failure; a reporter whose package is missing fails before training.
MLflow's and W&B's offline runs are checked under the slow marker (each starts a heavy client)."""

from __future__ import annotations

import json

import pytest

from conftest import make_job_dir
from tuneforge.engine import reporters
from tuneforge.engine.events import read_events
from tuneforge.recipes import sft
from tuneforge.spec.jobdir import EXIT_BAD_INPUT

QUICK = {"evaluation": {"metrics": ["loss"], "max_eval_examples": 8, "eval_before_training": False}}


def job(tmp_path, model_dir, **sections):
    for key, value in QUICK.items():
        sections.setdefault(key, value)
    return make_job_dir(tmp_path, model_dir, **sections)


def step_events(job_dir):
    return [e["data"] for e in read_events(job_dir) if e["type"] == "metrics" and "train_loss" in e["data"]]


def test_steps_carry_mfu_memory_and_samples_and_tensorboard_gets_the_same_numbers(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job_dir = job(tmp_path, tiny_model_dir, training={"max_steps": 6}, evaluation={**QUICK["evaluation"], "eval_every_steps": 3},
                  monitoring={"sample_interval_s": 0.5, "peak_flops": 1e11, "reporters": ["tensorboard"]})
    sft.run(job_dir, progress=False)
    steps = step_events(job_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for data in steps:
        assert 0 < data["mfu"] < 1 and data["rss_bytes"] > 50 << 20
    sampled = [s for s in steps if "cpu_percent" in s]
    assert sampled, "no system sample reached a step event"
    assert all(s["cpu_percent"] >= 0 and s["rss_peak_bytes"] > 50 << 20 for s in sampled)

    board = EventAccumulator(str(job_dir / reporters.TENSORBOARD_DIR))
    board.Reload()
    logged = {e.step: e.value for e in board.Scalars("train_loss")}
    assert logged == pytest.approx({s["step"]: s["train_loss"] for s in steps}, rel=1e-6)
    assert [e.step for e in board.Scalars("mfu")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in board.Scalars("valid_loss")] == [3, 6]  # validation events reach the reporters too


def test_an_alert_with_stop_job_checkpoints_and_fails_the_job_for_good(tmp_path, tiny_model_dir):
    # "max" on a loss that falls: the second validation is "worse", deterministically.
    job_dir = job(tmp_path, tiny_model_dir, training={"max_steps": 12},
                  evaluation={**QUICK["evaluation"], "eval_every_steps": 2}, checkpoint={"every_steps": 100},
                  monitoring={"sample_interval_s": None, "alerts": {"eval_worse": {
                      "enabled": True, "metric": "loss", "direction": "max", "evaluations": 1, "stop_job": True}}})
    code = sft.main(["--job-dir", str(job_dir), "--no-progress"])
    assert code == EXIT_BAD_INPUT
    events = list(read_events(job_dir))
    alert = next(e for e in events if e["data"].get("kind") == "alert")
    assert alert["level"] == "warning" and alert["data"]["alert"] == "eval_worse" and alert["data"]["step"] == 4
    checkpoints = [e["data"]["step"] for e in events if e["data"].get("kind") == "checkpoint"]
    assert checkpoints == [4]  # the checkpoint of the step the alert fired at, and training went no further
    assert max(s["step"] for s in step_events(job_dir)) == 4
    failure = events[-1]["data"]
    assert failure["status"] == "failed" and failure["retryable"] is False
    assert "AlertStop" in failure["error"] and "valid_loss got worse" in failure["error"]


def test_a_missing_reporter_package_fails_before_training(tmp_path, tiny_model_dir, monkeypatch):
    # Stands in for a worker without wandb: the module the reporter needs cannot be found.
    monkeypatch.setitem(reporters.REPORTER_MODULES, "wandb", "tuneforge_no_such_module")
    job_dir = job(tmp_path, tiny_model_dir, monitoring={"reporters": ["tensorboard", "wandb"]})
    assert sft.main(["--job-dir", str(job_dir), "--no-progress"]) == EXIT_BAD_INPUT
    events = list(read_events(job_dir))
    assert not any(e["type"] == "metrics" for e in events) and not (job_dir / "checkpoints").exists()
    assert "monitoring.reporters: wandb needs the tuneforge_no_such_module package" in events[-1]["data"]["error"]


@pytest.mark.slow
def test_mlflow_and_wandb_offline_runs_in_the_job_directory(tmp_path, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    job_dir = job(tmp_path, tiny_model_dir, training={"max_steps": 3},
                  monitoring={"sample_interval_s": None, "reporters": ["mlflow", "wandb"]})
    sft.run(job_dir, progress=False)
    steps = step_events(job_dir)

    client = MlflowClient(tracking_uri=f"sqlite:///{job_dir.resolve() / reporters.MLFLOW_DB}")
    (run,) = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    assert run.info.run_name == job_dir.name and run.info.status == "FINISHED"
    assert run.data.params["adapter.rank"] == "8"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == pytest.approx({s["step"]: s["train_loss"] for s in steps}, rel=1e-6)

    (offline,) = (job_dir / reporters.WANDB_DIR).glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads; its history items hold JSON values
    raw = records.read_bytes()
    assert b"train_loss" in raw and all(json.dumps(s["train_loss"]).encode() in raw for s in steps)
