"""The DPO recipe end to end on a tiny Llama built from a config, on the project's synthetic preference task
(examples/preference: the correct ISO date over a wrong one): it raises the held-out log-prob margin, writes
the typed summary, resumes bit-identically after kill -9, and trains under DDP like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_job_dir
from tuneforge.engine.events import read_events
from tuneforge.recipes import dpo
from tuneforge.spec.jobdir import JobSummary, read_summary

DATA = REPO / "examples" / "preference"


def dpo_job(tmp_path: Path, model_dir: Path, name: str = "job", **sections) -> Path:
    base = {
        "method": "dpo",
        "dataset": {"path": str(DATA / "train.jsonl"), "validation_path": str(DATA / "val.jsonl"), "max_seq_length": 256},
        "training": {"learning_rate": 5e-3, "batch_size": 8, "per_device_batch_size": 4, "max_steps": 10},
        "evaluation": {"metrics": ["loss"], "max_eval_examples": 24},
        "dpo": {"beta": 0.1},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return make_job_dir(tmp_path / name, model_dir, **base)


def recipe(job_dir: Path, home: Path, faults: str = "") -> int:
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_FAULT_INJECTION": faults}
    done = subprocess.run([sys.executable, "-m", "tuneforge.recipes.dpo", "--job-dir", str(job_dir), "--no-progress"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode not in (0, -9):
        print(done.stdout, done.stderr)
    return done.returncode


def steps_of(job_dir: Path) -> dict[int, tuple]:
    """step -> (loss, margin, example ids); a step replayed after a resume must agree with its first run."""
    seen: dict[int, tuple] = {}
    for event in read_events(job_dir):
        data = event["data"]
        if event["type"] == "metrics" and "train_loss" in data:
            record = (data["train_loss"], data["train_rewards_margins"], tuple(data["example_ids"]))
            assert seen.setdefault(data["step"], record) == record, f"step {data['step']} differs when replayed"
    return seen


def test_lora_dpo_raises_the_margin_and_writes_the_typed_summary(tmp_path, tiny_model_dir, tuneforge_home):
    job_dir = dpo_job(tmp_path, tiny_model_dir, training={"max_steps": 16})
    summary = dpo.run(job_dir, progress=False)
    assert summary.method == "dpo" and summary.output == "adapter" and summary.steps == 16
    assert read_summary(job_dir) == summary == JobSummary.model_validate_json((job_dir / "summary.json").read_text())
    base, tuned = summary.eval.base, summary.eval.fine_tuned
    assert base.reward_margin == 0.0 and base.reward_accuracy == 0.0  # before training the policy is the reference
    assert tuned.preference_margin > base.preference_margin + 1.0  # the held-out log-prob margin goes up
    assert tuned.reward_margin > 0 and tuned.reward_accuracy > 0.6 and tuned.loss < base.loss
    metrics = [e["data"] for e in read_events(job_dir) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert {"train_rewards_chosen", "train_rewards_rejected", "train_rewards_margins", "train_rewards_accuracies",
            "train_logps_chosen", "train_logps_rejected"} <= set(metrics[0])
    assert metrics[0]["train_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2: zero margin at the start
    assert sum(m["train_rewards_margins"] for m in metrics[8:]) > 0  # the training pairs' implicit margin grows too
    resolved = json.loads((job_dir / "resolved_spec.json").read_text())
    assert resolved["dpo"]["reference"] == "adapter_disabled" and resolved["dataset"]["format"] == "preference"


def test_the_cli_runs_a_dpo_job_file_with_generated_metrics(tmp_path, tiny_model_dir, tuneforge_home):
    job_file = tmp_path / "dpo.yaml"
    job_file.write_text(
        f"method: dpo\nmodel:\n  base_model: {tiny_model_dir}\n"
        f"dataset:\n  path: {DATA / 'train.jsonl'}\n  validation_path: {DATA / 'val.jsonl'}\n"
        "training:\n  max_steps: 3\n  batch_size: 4\n  learning_rate: 1.0e-3\n"
        "evaluation:\n  metrics: [loss, perplexity, exact_match]\n  max_eval_examples: 4\n  max_new_tokens: 12\n"
        "dpo:\n  loss_type: ipo\n  beta: 0.5\n  max_prompt_length: 64\n")
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home)}
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(job_file), "--job-dir",
                           str(tmp_path / "job"), "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(tmp_path / "job")
    tuned = summary.eval.fine_tuned
    assert summary.method == "dpo" and tuned.exact_match is not None and len(tuned.samples) == 3
    assert tuned.perplexity > 1 and summary.eval.base.perplexity > 1
    assert all(s.reference[:2] in ("19", "20") for s in tuned.samples)  # the reference is the chosen (ISO) date


def test_full_fine_tuning_kill_9_then_resume_is_bit_identical(tmp_path, tiny_model_dir, tuneforge_home):
    """Full fine-tuning precomputes the reference from the initial weights; a resumed run (whose weights are no
    longer the initial ones) must use the very same numbers: they travel in the checkpoint."""
    sections = {"adapter": {"type": "full"}, "training": {"learning_rate": 1e-3}, "evaluation": {"max_eval_examples": 8},
                "checkpoint": {"every_steps": 3, "keep_last": 2, "max_restarts": 0}}
    reference = dpo_job(tmp_path, tiny_model_dir, "reference", **sections)
    assert recipe(reference, tuneforge_home) == 0
    job_dir = dpo_job(tmp_path, tiny_model_dir, "killed", **sections)
    assert recipe(job_dir, tuneforge_home, "kill_at_step=7") == -9
    assert not (job_dir / "summary.json").exists()
    trainer_state = json.loads((job_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert len(trainer_state["reference_logps"]["train"]) == 400  # the reference, per pair id
    assert recipe(job_dir, tuneforge_home) == 0
    events = list(read_events(job_dir))
    assert [e["data"]["step"] for e in events if e["data"].get("kind") == "resumed"] == [6]
    assert sum(e["data"].get("kind") == "reference" for e in events) == 1  # computed once, by the first run
    assert steps_of(job_dir) == steps_of(reference) and sorted(steps_of(job_dir)) == list(range(1, 11))
    ours, theirs = load_file(job_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_summary(job_dir).eval == read_summary(reference).eval


def test_ddp_with_2_processes_trains_like_one(tmp_path, tiny_model_dir, tuneforge_home):
    from tuneforge.launch.commands import recipe_command
    from tuneforge.launch.supervisor import supervise
    from tuneforge.spec.jobdir import read_spec

    single = dpo_job(tmp_path, tiny_model_dir, "single", training={"max_steps": 4})
    assert recipe(single, tuneforge_home) == 0
    ddp = dpo_job(tmp_path, tiny_model_dir, "ddp", training={"max_steps": 4, "gradient_accumulation_steps": 1},
                  resources={"num_gpus": 2, "strategy": "ddp"})
    env = {"TUNEFORGE_HOME": str(tuneforge_home), "PYTHONPATH": str(REPO / "src")}
    assert supervise(ddp, recipe_command(read_spec(ddp), ddp), max_restarts=0, env=env).status == "succeeded"
    ours, theirs = steps_of(ddp), steps_of(single)
    assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4]
    for step in theirs:
        assert ours[step][0] == pytest.approx(theirs[step][0], rel=1e-4, abs=1e-6)
        assert ours[step][1] == pytest.approx(theirs[step][1], rel=1e-3, abs=1e-5)
    adapter = load_file(ddp / "adapter" / "adapter_model.safetensors")
    reference = load_file(single / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(adapter[k], reference[k], atol=1e-5) for k in reference)
