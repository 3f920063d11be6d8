"""Monitoring parts without training: the alert rules, the system sampler's summaries, the MFU arithmetic
against the planner's FLOP model, GPU names, reporters' availability and the submission check."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tuneforge.engine.alerts import AlertMonitor
from tuneforge.engine.monitoring import MfuEstimator, SystemSampler, gpu_type_of
from tuneforge.launch.capabilities import host_reporters, reporter_problem
from tuneforge.planner.models import load_model_arch
from tuneforge.planner.plan import setup_from_job
from tuneforge.planner.throughput import flops_per_token
from tuneforge.scheduler.submission import check_submission
from tuneforge.spec import validate_job_spec
from tuneforge.spec.loader import SpecError
from tuneforge.spec.monitoring import AlertsSpec


def monitor(**alerts):
    events = []
    off = {name: {"enabled": False} for name in AlertsSpec.model_fields}
    spec = AlertsSpec.model_validate({**off, **{name: {"enabled": True, **rule} for name, rule in alerts.items()}})
    return AlertMonitor(spec, lambda message, **data: events.append((message, data))), events


def states(events):
    return [(data["alert"], data["state"]) for _, data in events]


def test_nan_loss_fires_once_clears_and_asks_for_the_stop():
    alerts, events = monitor(loss_nan={"stop_job": True})
    alerts.observe_step(1, 2.0, 100.0)
    assert events == [] and alerts.stop_reason is None
    alerts.observe_step(2, math.nan, 100.0)
    alerts.observe_step(3, math.inf, 100.0)  # still firing: no second event
    alerts.observe_step(4, 1.9, 100.0)
    assert states(events) == [("loss_nan", "firing"), ("loss_nan", "resolved")]
    message, data = events[0]
    assert data["step"] == 2 and data["stop_job"] is True and "stop" in message
    assert alerts.stop_reason.startswith("alert loss_nan: train_loss is nan at step 2")


def test_divergence_is_a_sustained_rise_of_the_moving_average_above_its_running_minimum():
    alerts, events = monitor(loss_divergence={"factor": 3.0, "after_steps": 3})
    # A single spike moves the average (0.9) from 1.0 to 1.9 only; a sustained 10 takes it past 3 at its third step.
    for step, loss in enumerate([1.0] * 5 + [10.0] + [1.0] * 10 + [10.0] * 3, start=1):
        alerts.observe_step(step, loss, 100.0)
    assert states(events) == [("loss_divergence", "firing")]
    data = events[0][1]
    assert data["step"] == 19 and data["train_loss"] == 10.0 and data["smoothed_loss"] > 3.0
    assert alerts.stop_reason is None  # stop_job is off by default


def test_throughput_drop_needs_a_full_window_and_uses_its_median():
    alerts, events = monitor(throughput_drop={"fraction": 0.5, "window": 3})
    for step, speed in enumerate([10.0, 1000.0, 1000.0, 900.0, 400.0, 1000.0], start=1):
        alerts.observe_step(step, 1.0, speed)
    # Step 2's jump is not checked (window not full); step 5's 400 < 0.5 x median(1000, 1000, 900).
    assert states(events) == [("throughput_drop", "firing"), ("throughput_drop", "resolved")]
    assert events[0][1]["step"] == 5 and events[0][1]["running_median"] == 1000.0


@pytest.mark.parametrize("direction, values, fires_at", [
    ("min", [2.0, 2.1, 2.2, 2.3], 4),  # three evaluations each worse than the one before
    ("min", [2.0, 2.1, 1.9, 2.0, 2.1], None),  # an improvement resets the count
    ("max", [0.5, 0.4, 0.3, 0.2], 4),  # accuracy falling
])
def test_eval_worse_counts_evaluations_in_a_row(direction, values, fires_at):
    alerts, events = monitor(eval_worse={"metric": "loss", "direction": direction, "evaluations": 3})
    for index, value in enumerate(values, start=1):
        alerts.observe_eval(index * 10, {"loss": value, "perplexity": 1.0})
    if fires_at is None:
        assert events == []
    else:
        assert states(events) == [("eval_worse", "firing")] and events[0][1]["step"] == fires_at * 10


def test_alerts_on_by_default_and_closed_choices():
    spec = validate_job_spec({"dataset": {"path": "file-x"}})
    alerts = spec.monitoring.alerts
    assert [name for name in AlertsSpec.model_fields if getattr(alerts, name).enabled] == [
        "loss_nan", "loss_divergence", "no_progress"]
    assert spec.monitoring.sample_interval_s == 10.0 and spec.monitoring.reporters == []
    with pytest.raises(SpecError, match="monitoring.reporters"):
        validate_job_spec({"dataset": {"path": "file-x"}, "monitoring": {"reporters": ["neptune"]}})
    with pytest.raises(SpecError, match="monitoring.alerts.loss_divergence.factor: expected greater than 1"):
        validate_job_spec({"dataset": {"path": "file-x"}, "monitoring": {"alerts": {"loss_divergence": {"factor": 0.5}}}})


def test_the_sampler_thread_summarizes_what_it_sampled_since_the_last_take():
    sampler = SystemSampler(0.02, use_gpus=False).start()
    try:
        deadline = time.monotonic() + 10
        burn = 0
        while time.monotonic() < deadline and len(sampler._samples) < 3:
            burn += sum(range(10_000))  # some CPU for cpu_percent to see
        first = sampler.take()
        second = sampler.take()
    finally:
        sampler.stop()
    assert set(first) == {"cpu_percent", "rss_peak_bytes"}
    assert first["cpu_percent"] >= 0 and first["rss_peak_bytes"] > 10 << 20 and isinstance(first["rss_peak_bytes"], int)
    assert second == {} or set(second) == set(first)  # only what came after the first take
    assert not sampler._thread.is_alive()


def test_a_run_shorter_than_one_interval_still_reports_a_reading_on_its_first_step():
    # On a fast machine six tiny steps end before an interval of 0.5 s: the first take reads the hardware itself.
    sampler = SystemSampler(3600, use_gpus=False).start()
    try:
        first, second = sampler.take(), sampler.take()
    finally:
        sampler.stop()
    assert set(first) == {"cpu_percent", "rss_peak_bytes"} and first["rss_peak_bytes"] > 10 << 20
    assert second == {}  # afterwards only the thread's own samples, one per interval


def test_mfu_is_the_planner_flops_times_tokens_over_the_peak():
    spec = validate_job_spec({"model": {"base_model": "tiny-llama"}, "dataset": {"path": "data.jsonl"},
                              "training": {"precision": "fp32", "per_device_batch_size": 2},
                              "monitoring": {"peak_flops": 1e12}})
    estimator = MfuEstimator(spec, torch.device("cpu"), "fp32", world_size=2)
    arch, setup = load_model_arch("tiny-llama"), setup_from_job(spec)
    for seq_len in (64, 300):
        expected = 5000.0 * flops_per_token(arch, setup.but(seq_len=seq_len))[0] / (1e12 * 2)
        assert estimator.mfu(5000.0, seq_len) == pytest.approx(expected, rel=1e-9)
    no_peak = validate_job_spec({"model": {"base_model": "tiny-llama"}, "dataset": {"path": "data.jsonl"}})
    assert MfuEstimator(no_peak, torch.device("cpu"), "fp32", world_size=1).mfu(5000.0, 64) is None  # a CPU has no peak


@pytest.mark.parametrize("name, memory_gib, expected", [
    ("NVIDIA H200", 141, "h200"), ("NVIDIA H100 80GB HBM3", 80, "h100-80gb"), ("NVIDIA A100-SXM4-40GB", 40, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 80, "a100-80gb"), ("NVIDIA A10G", 23, "a10g"), ("Tesla T4", 15, "t4"),
    ("NVIDIA L4", 23, "l4"), ("NVIDIA GeForce RTX 4090", 24, None),
])
def test_gpu_names_map_to_the_planners_datasheet_table(name, memory_gib, expected):
    assert gpu_type_of(name, memory_gib << 30) == expected


def test_submission_refuses_a_reporter_no_live_worker_has():
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"gpu_type": "cpu"},
                              "monitoring": {"reporters": ["tensorboard", "wandb"]}})
    node = {"gpu_type": "cpu", "gpus": 1, "strategies": ["ddp", "fsdp"]}
    without = [{"worker": "w1", "executor": "local", "nodes": [{**node, "reporters": ["tensorboard"]}]}]
    problem = check_submission(spec, without).problem
    assert problem.code == "invalid_reporter" and problem.param == "tuneforge.monitoring.reporters"
    assert "no live worker has wandb installed" in problem.message and "offer tensorboard" in problem.message
    with_both = [*without, {"worker": "w2", "executor": "local", "nodes": [{**node, "reporters": ["wandb", "tensorboard"]}]}]
    assert check_submission(spec, with_both).problem is None
    assert reporter_problem(["wandb"], [{"nodes": [node]}]) is None  # a worker that predates the report: not refused
    assert set(host_reporters()) == {"tensorboard", "mlflow", "wandb"}  # the dev environment has all three
