"""The job-directory contract: spec.json written once, resolved_spec.json beside it, a typed summary."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tuneforge.spec import validate_job_spec
from tuneforge.spec.jobdir import (
    EvalMetrics,
    Evaluation,
    JobSummary,
    RankMemory,
    SpecChanged,
    read_resolved_spec,
    read_spec,
    read_summary,
    write_resolved_spec,
    write_spec,
    write_summary,
)


def summary(**changes) -> JobSummary:
    values = dict(
        method="sft", adapter="lora", base_model="tiny-llama", device="cpu", precision="fp32", steps=4, epochs=0.5,
        train_loss=1.25, train_loss_last_10_mean=1.5, tokens_seen=1000, trained_tokens=400, trainable_parameters=32,
        eval=Evaluation(base=EvalMetrics(loss=2.0, perplexity=7.39),
                        fine_tuned=EvalMetrics(loss=1.0, perplexity=2.72, exact_match=0.5,
                                               samples=[{"prompt": "p", "reference": "r", "prediction": "r"}])),
        best_checkpoint={"step": 4, "valid_loss": 1.0}, output="adapter", train_seconds=3.5, wall_time_s=9.0,
        world_size=1, strategy="single",
        ranks=[RankMemory(rank=0, parameters=10, parameter_bytes=40, trainable_parameters=2, optimizer_state_bytes=16,
                          peak_memory_bytes=1 << 20)],
    )
    return JobSummary(**{**values, **changes})


def test_the_summary_round_trips_through_summary_json(tmp_path):
    written = summary()
    write_summary(tmp_path, written)
    assert read_summary(tmp_path) == written
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["eval"]["fine_tuned"]["samples"][0]["prediction"] == "r" and on_disk["status"] == "succeeded"
    assert written.scalars()["steps"] == 4 and "ranks" not in written.scalars()


def test_no_summary_is_none_and_a_wrong_one_is_an_error(tmp_path):
    assert read_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({**summary().model_dump(mode="json"), "stepz": 4}))
    with pytest.raises(ValidationError, match="stepz"):
        read_summary(tmp_path)


def test_spec_json_is_written_once(tmp_path):
    spec = validate_job_spec({"dataset": {"path": "d.jsonl"}})
    write_spec(tmp_path, spec)
    before = (tmp_path / "spec.json").read_bytes()
    write_spec(tmp_path, validate_job_spec({"dataset": {"path": "d.jsonl"}}))  # the same job: nothing changes
    assert (tmp_path / "spec.json").read_bytes() == before
    with pytest.raises(SpecChanged):
        write_spec(tmp_path, validate_job_spec({"dataset": {"path": "d.jsonl"}, "training": {"seed": 3}}))
    assert (tmp_path / "spec.json").read_bytes() == before and read_spec(tmp_path) == spec


def test_the_resolved_spec_lives_beside_the_submitted_one(tmp_path):
    spec = validate_job_spec({"dataset": {"path": "d.jsonl"}})
    write_spec(tmp_path, spec)
    assert read_resolved_spec(tmp_path) is None
    resolved = spec.model_copy(deep=True)
    resolved.training.learning_rate, resolved.training.batch_size = 2e-4, 8
    write_resolved_spec(tmp_path, resolved)
    assert read_resolved_spec(tmp_path)["training"]["learning_rate"] == 2e-4
    assert read_spec(tmp_path).training.learning_rate == "auto"
