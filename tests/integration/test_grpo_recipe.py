"""The GRPO recipe end to end on a tiny Llama: a grader's rule reward raises the held-out pass rate, the
summary is typed, and a run preempted with SIGTERM resumes to exactly the uninterrupted result."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from tuneforge.engine.events import read_events
from tuneforge.recipes import grpo
from tuneforge.spec import validate_job_spec
from tuneforge.spec.jobdir import EXIT_PREEMPTED, read_summary, write_spec

LETTER_GRADER = {"type": "string_check", "name": "has_a", "input": "{{sample.output_text}}",
                 "reference": "{{item.answer}}", "operation": "like"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the 2-core CI box is shared); the preempted subprocess
    runs on one too (OMP_NUM_THREADS), so every run computes alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rl_job_dir(tmp_path, model_dir, name: str = "job", **sections):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: reply with the letter a."}], "answer": "a"}
            for i in range(40)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    spec = {
        "method": "grpo",
        "model": {"base_model": str(model_dir)},
        "dataset": {"path": str(data), "max_seq_length": 96, "train_split": 0.8},
        "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 2e-2, "max_steps": 10, "seed": 0, "warmup_ratio": 0.0,
                     "lr_scheduler": "constant"},
        "rollout": {"prompts_per_step": 4, "max_new_tokens": 16, "graders": [LETTER_GRADER]},
        "grpo": {"num_generations": 8},
        "evaluation": {"max_eval_examples": 8, "max_new_tokens": 16},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    job_dir = tmp_path / name
    job_dir.mkdir()
    write_spec(job_dir, validate_job_spec(spec))
    return job_dir


def step_records(job_dir) -> dict[int, tuple]:
    seen = {}
    for event in read_events(job_dir):
        data = event["data"]
        if event["type"] == "metrics" and "train_loss" in data:
            record = (data["train_loss"], data["train_reward"], data["train_kl"], tuple(data["example_ids"]))
            assert seen.setdefault(data["step"], record) == record, f"step {data['step']} differs when replayed"
    return seen


def test_grpo_raises_the_pass_rate_and_writes_a_typed_summary(tmp_path, tiny_model_dir):
    job_dir = rl_job_dir(tmp_path, tiny_model_dir)
    summary = grpo.run(job_dir, progress=False)

    assert read_summary(job_dir) == summary and summary.method == "grpo" and summary.steps == 10
    base, tuned = summary.eval.base, summary.eval.fine_tuned
    assert base.pass_rate == 0.0 and base.kl_to_reference == pytest.approx(0.0, abs=1e-6)
    assert tuned.pass_rate >= 0.75 and tuned.graders["has_a"] == tuned.pass_rate
    assert 0.0 < tuned.kl_to_reference < 5.0
    metrics = [e["data"] for e in read_events(job_dir) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    for m in metrics:
        assert {"train_reward", "train_kl", "train_entropy", "train_clip_fraction", "train_response_length",
                "train_pass_rate", "train_reward_std_in_group", "learning_rate"} <= set(m)
        assert m["train_clip_fraction"] == 0.0  # one optimizer step per batch: the ratio is 1, nothing clips
    assert metrics[0]["train_kl"] == 0.0


def test_full_fine_tuning_keeps_a_frozen_reference(tmp_path, tiny_model_dir):
    job_dir = rl_job_dir(tmp_path, tiny_model_dir, adapter={"type": "full"},
                         training={"max_steps": 2, "learning_rate": 1e-3}, rollout={"max_new_tokens": 8},
                         evaluation={"max_eval_examples": 4, "max_new_tokens": 8})
    summary = grpo.run(job_dir, progress=False)
    assert summary.output == "model" and (job_dir / "model" / "model.safetensors").is_file()
    kls = [e["data"]["train_kl"] for e in read_events(job_dir) if e["type"] == "metrics"]
    assert kls[0] == 0.0 and kls[1] > 0  # the trained weights moved away from the frozen copy of the base
    assert abs(summary.eval.base.kl_to_reference) < 1e-6 < summary.eval.fine_tuned.kl_to_reference


def test_grpo_preempted_with_sigterm_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, tuneforge_home):
    sections = {"training": {"max_steps": 6}, "adapter": {"dropout": 0.1},
                "grpo": {"num_generations": 4, "num_iterations": 2, "loss_type": "dr_grpo"},
                "rollout": {"prompts_per_step": 4, "max_new_tokens": 8}}
    reference = rl_job_dir(tmp_path, tiny_model_dir, "reference", **sections)
    grpo.run(reference, progress=False)
    clipped = [e["data"]["train_clip_fraction"] for e in read_events(reference) if e["type"] == "metrics"]
    assert max(clipped) > 0  # the second optimizer step on each batch moves the ratio off 1

    job_dir = rl_job_dir(tmp_path, tiny_model_dir, "preempted", **sections)
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tuneforge.recipes.grpo", "--job-dir", str(job_dir),
                                "--no-progress"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(e["type"] == "metrics" and e["data"]["step"] >= 2 for e in read_events(job_dir)):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-2000:]
        time.sleep(0.05)
    process.terminate()
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    stopped = [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("status") == "preempted"]
    assert len(stopped) == 1 and stopped[0] < 6
    grpo.run(job_dir, progress=False)

    resumed = [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("kind") == "resumed"]
    assert resumed == stopped
    assert step_records(job_dir) == step_records(reference) and sorted(step_records(job_dir)) == list(range(1, 7))
    ours, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (job_dir, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_summary(job_dir).eval == read_summary(reference).eval


def test_two_ddp_processes_sample_and_train_like_one(tmp_path, tiny_model_dir, tuneforge_home):
    """Each completion's sampling is seeded by its own place in the run, so 2 processes splitting a step's
    prompts sample exactly the completions one process samples; the loss over both ranks is the same loss."""
    from tuneforge.launch.commands import recipe_command
    from tuneforge.launch.supervisor import supervise
    from tuneforge.spec.jobdir import read_spec

    sections = {"training": {"max_steps": 3}, "rollout": {"prompts_per_step": 4, "max_new_tokens": 16},
                "grpo": {"num_generations": 4}, "evaluation": {"max_eval_examples": 4, "max_new_tokens": 8}}
    single = rl_job_dir(tmp_path, tiny_model_dir, "single", **sections)
    grpo.run(single, progress=False)
    ddp = rl_job_dir(tmp_path, tiny_model_dir, "ddp", resources={"num_gpus": 2, "strategy": "ddp"}, **sections)
    env = {"TUNEFORGE_HOME": str(tuneforge_home), "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    assert supervise(ddp, recipe_command(read_spec(ddp), ddp), max_restarts=0, env=env).status == "succeeded"

    def steps(job_dir):
        return {e["data"]["step"]: e["data"] for e in read_events(job_dir) if e["type"] == "metrics"}

    ours, theirs = steps(ddp), steps(single)
    assert sorted(ours) == sorted(theirs) == [1, 2, 3]
    for step, reference in theirs.items():
        assert ours[step]["example_ids"] == reference["example_ids"]  # the same prompts
        assert ours[step]["train_reward"] == reference["train_reward"]  # the same completions, graded alike
        for name in ("train_loss", "train_kl", "train_entropy", "train_response_length"):
            assert ours[step][name] == pytest.approx(reference[name], abs=1e-5), (step, name)
    summaries = [read_summary(d) for d in (ddp, single)]
    assert summaries[0].world_size == 2
    assert summaries[0].eval.fine_tuned.mean_reward == summaries[1].eval.fine_tuned.mean_reward
    # The gradients agree to float32 summation order; Adam divides each coordinate by its own scale, so on
    # coordinates whose gradient is nearly 0 that difference becomes a visible part of a 2e-2 step.
    weights = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ddp, single)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-3) for k in weights[1])
