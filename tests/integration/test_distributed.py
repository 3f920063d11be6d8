"""Distributed training for real on CPU: 2 processes under torchrun with the gloo backend.

DDP and FSDP must train exactly like one process with the same global batch; FSDP must really shard;
a dead rank must fail the job promptly with its rank named, and the sharded checkpoint must resume to
the same losses; the consolidated final weights must equal the single-process ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_job_dir
from tuneforge.launch.commands import recipe_command
from tuneforge.launch.supervisor import supervise
from tuneforge.engine.events import read_events
from tuneforge.spec.jobdir import read_spec

STEPS = 6
# Global batch 8 every time: 1 process x 8, or 2 processes x 4.
SECTIONS = {
    "training": {"max_steps": STEPS, "batch_size": 8, "per_device_batch_size": 4, "gradient_accumulation_steps": 2},
    "evaluation": {"metrics": ["loss"], "max_eval_examples": 8},
    "checkpoint": {"every_steps": 2, "keep_last": 2, "max_restarts": 0},
}


def job_with(tmp_path: Path, model_dir: Path, name: str, *, processes: int = 1, strategy: str = "ddp", **extra) -> Path:
    sections = json.loads(json.dumps(SECTIONS))
    if processes > 1:
        sections["training"]["gradient_accumulation_steps"] = 1
        sections["resources"] = {"num_gpus": processes, "strategy": strategy}
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return make_job_dir(tmp_path / name, model_dir, **sections)


def run(job_dir: Path, home: Path, faults: str = "", max_restarts: int = 0):
    env = {"TUNEFORGE_HOME": str(home), "TUNEFORGE_FAULT_INJECTION": faults, "PYTHONPATH": str(REPO / "src")}
    os.environ.update(env)
    try:
        return supervise(job_dir, recipe_command(read_spec(job_dir), job_dir), max_restarts=max_restarts, env=env)
    finally:
        os.environ.pop("TUNEFORGE_FAULT_INJECTION", None)


def losses(job_dir: Path) -> dict[int, float]:
    out = {}
    for event in read_events(job_dir):
        if event["type"] == "metrics" and "train_loss" in event["data"]:
            out[event["data"]["step"]] = event["data"]["train_loss"]
    return out


def assert_same_curve(ours: dict[int, float], reference: dict[int, float], tolerance: float = 1e-4) -> None:
    assert sorted(ours) == sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(ours[step] - loss) / abs(loss) < tolerance, f"step {step}: {ours[step]} vs {loss}"


def assert_same_weights(ours: dict, reference: dict, tolerance: float = 1e-5) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(ours[key], reference[key], atol=tolerance, rtol=0), key


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir) -> Path:
    home = tmp_path_factory.mktemp("home")
    job_dir = job_with(tmp_path_factory.mktemp("single"), tiny_model_dir, "single")
    assert run(job_dir, home).status == "succeeded"
    return job_dir


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, tiny_model_dir) -> Path:
    home = tmp_path_factory.mktemp("home")
    job_dir = job_with(tmp_path_factory.mktemp("fsdp"), tiny_model_dir, "fsdp", processes=2, strategy="fsdp")
    assert run(job_dir, home).status == "succeeded"
    return job_dir


def test_fsdp_trains_like_one_process_shards_the_model_and_consolidates_the_adapter(single, fsdp):
    assert_same_curve(losses(fsdp), losses(single))
    ranks = json.loads((fsdp / "summary.json").read_text())["ranks"]
    total = json.loads((single / "summary.json").read_text())["ranks"][0]["parameters"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:  # each rank holds about half of every parameter (and of the optimizer state)
        assert abs(rank["parameters"] / total - 0.5) < 0.02, rank
    # The memory planner's per-rank weights and optimizer state for this FSDP job are what each rank held.
    from tuneforge.planner import plan_job

    spec = read_spec(fsdp)
    spec.resources.gpu_type = "cpu"
    planned = plan_job(spec).memory
    for rank in ranks:
        assert abs(rank["parameter_bytes"] / planned.weights - 1) < 0.02
        assert abs(rank["optimizer_state_bytes"] / planned.optimizer - 1) < 0.02
    # One adapter file on rank 0, loadable by PEFT, equal to the single-process result.
    assert sorted(p.name for p in (fsdp / "adapter").iterdir() if p.name.startswith("adapter")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_weights(load_file(fsdp / "adapter" / "adapter_model.safetensors"),
                        load_file(single / "adapter" / "adapter_model.safetensors"))
    # Only rank 0 writes events: every step appears once.
    steps = [e["data"]["step"] for e in read_events(fsdp) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert steps == list(range(1, STEPS + 1))
    # The checkpoints hold one shard file per rank, verified by the manifest like any other.
    newest = sorted((fsdp / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in (newest / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (newest / "rng.pt").is_file() and (newest / "rng-1.pt").is_file()


def test_ddp_trains_like_one_process(single, tmp_path, tiny_model_dir, tuneforge_home):
    job_dir = job_with(tmp_path, tiny_model_dir, "ddp", processes=2, strategy="ddp")
    assert run(job_dir, tuneforge_home).status == "succeeded"
    assert_same_curve(losses(job_dir), losses(single))
    ranks = json.loads((job_dir / "summary.json").read_text())["ranks"]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]  # replicas: every rank holds everything
    assert_same_weights(load_file(job_dir / "adapter" / "adapter_model.safetensors"),
                        load_file(single / "adapter" / "adapter_model.safetensors"))


def test_a_killed_rank_fails_the_job_promptly_by_name_and_the_shards_resume_to_the_same_losses(
        fsdp, tmp_path, tiny_model_dir, tuneforge_home):
    job_dir = job_with(tmp_path, tiny_model_dir, "killed", processes=2, strategy="fsdp")
    started = time.monotonic()
    outcome = run(job_dir, tuneforge_home, faults="kill_at_step=3,rank=1")
    elapsed = time.monotonic() - started
    assert outcome.status == "failed"
    assert "rank 1 (local rank 1) killed by SIGKILL" in outcome.reason
    assert elapsed < 120, f"took {elapsed:.0f}s to notice the dead rank"
    errors = [e for e in read_events(job_dir) if e["data"].get("kind") == "rank_failed"]
    assert errors and "rank 1" in errors[-1]["message"]
    assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == ["step-000002"]

    # The same job, started again, resumes from the step-2 shards and retraces the uninterrupted run.
    assert run(job_dir, tuneforge_home).status == "succeeded"
    assert any(e["data"].get("kind") == "resumed" and e["data"]["step"] == 2 for e in read_events(job_dir))
    resumed = losses(job_dir)
    assert_same_curve(resumed, losses(fsdp), tolerance=1e-6)
    assert_same_weights(load_file(job_dir / "adapter" / "adapter_model.safetensors"),
                        load_file(fsdp / "adapter" / "adapter_model.safetensors"), tolerance=1e-6)


# ZeRO-3 (its partitioned parameters look 1-d until gathered: the weight-decay groups must read ds_shape) behind
# slow: the default suite trains ZeRO-3 with LoRA above.
@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_full_fine_tuning_on_two_ranks_consolidates_one_model(strategy, tmp_path, tiny_model_dir, tuneforge_home):
    full = {"adapter": {"type": "full"}, "training": {"learning_rate": 1e-3, "max_steps": 3, "weight_decay": 0.1},
            "checkpoint": {"every_steps": 3}}
    one = job_with(tmp_path, tiny_model_dir, "one", **full)
    sharded = ({"strategy": "fsdp"} if strategy == "fsdp"
               else {"strategy": "deepspeed", "resources": {"deepspeed_stage": 3}})
    if strategy != "fsdp":
        pytest.importorskip("deepspeed")
    two = job_with(tmp_path, tiny_model_dir, "two", processes=2, **sharded, **full)
    for job_dir in (one, two):
        assert run(job_dir, tuneforge_home).status == "succeeded"
    ours, theirs = load_file(two / "model" / "model.safetensors"), load_file(one / "model" / "model.safetensors")
    assert_same_weights(ours, theirs)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "model")  # a plain Hugging Face model directory


# fsdp behind slow: the CLI and preemption path is the same torchrun launch (CI time)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_the_cli_launches_torchrun_and_preemption_stops_every_rank(strategy, tmp_path, tiny_model_dir, tuneforge_home):
    """SIGTERM to `tuneforge train`: every rank agrees to stop, checkpoints and the command exits 75."""
    job_dir = job_with(tmp_path, tiny_model_dir, "cli", processes=2, strategy=strategy,
                       training={"max_steps": 200}, checkpoint={"every_steps": 100})
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", "--resume", str(job_dir), "--no-progress"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not losses(job_dir) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(15)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 75, output
    stopped = max(losses(job_dir))
    assert (job_dir / "checkpoints" / f"step-{stopped:06d}").is_dir()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the default suite runs two nodes through Ray (test_ray_multinode.py), same c10d rendezvous
def test_two_nodes_rendezvous_and_train_like_one_process(single, tmp_path, tiny_model_dir, tuneforge_home):
    """resources.num_nodes 2: `tuneforge train` prints each node's command; run on two 'nodes' (two
    launchers on this machine, c10d rendezvous, shared job directory) they train like one process."""
    job_dir = job_with(tmp_path, tiny_model_dir, "nodes", processes=1, resources={"num_nodes": 2, "strategy": "fsdp"},
                       training={"gradient_accumulation_steps": 1})
    env = {**os.environ, "TUNEFORGE_HOME": str(tuneforge_home), "PYTHONPATH": str(REPO / "src")}
    cli = [sys.executable, "-m", "tuneforge.cli", "train", "--resume", str(job_dir), "--no-progress"]
    printed = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert f"node 1: tuneforge train --resume {job_dir} --node-rank 1 --rdzv-endpoint" in printed.stdout

    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([*cli, "--node-rank", str(n), "--rdzv-endpoint", endpoint], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_same_curve(losses(job_dir), losses(single))
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"


@pytest.mark.parametrize("resources", [
    pytest.param({"fsdp_sharding": "shard_grad_op", "cpu_offload": True}, marks=pytest.mark.slow),
    {"fsdp_sharding": "hybrid_shard"},
], ids=["shard_grad_op+offload", "hybrid_shard"])
def test_fsdp_sharding_modes_train_like_one_process(resources, single, tmp_path, tiny_model_dir, tuneforge_home):
    job_dir = job_with(tmp_path, tiny_model_dir, "mode", processes=2, strategy="fsdp", resources=resources)
    assert run(job_dir, tuneforge_home).status == "succeeded"
    assert_same_curve(losses(job_dir), losses(single))
    if resources.get("cpu_offload"):  # nothing to offload to on a CPU: said, not silently dropped
        assert any(e["data"].get("kind") == "cpu_offload_ignored" for e in read_events(job_dir))


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_qlora_shards_the_adapter(strategy, tmp_path, tiny_model_dir, tuneforge_home):
    """FSDP keeps the 4-bit base whole on every rank; ZeRO-3 partitions it too. Both shard the adapter."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    job_dir = job_with(tmp_path, tiny_model_dir, "qlora", processes=2, strategy=strategy,
                       adapter={"type": "qlora"}, training={"max_steps": 2})
    assert run(job_dir, tuneforge_home).status == "succeeded"
    summary = json.loads((job_dir / "summary.json").read_text())
    for rank in summary["ranks"]:
        assert rank["trainable_parameters"] * 2 == summary["trainable_parameters"]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(job_dir / "adapter").r == 8


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), pytest.param(3, True, marks=pytest.mark.slow)],
                         ids=["zero2", "zero3", "zero3+offload"])
def test_deepspeed_zero_trains_like_one_process_and_consolidates_the_adapter(stage, offload, single, tmp_path,
                                                                             tiny_model_dir, tuneforge_home):
    pytest.importorskip("deepspeed")
    job_dir = job_with(tmp_path, tiny_model_dir, "zero", processes=2, strategy="deepspeed",
                       resources={"deepspeed_stage": stage, "cpu_offload": offload})
    assert run(job_dir, tuneforge_home).status == "succeeded"
    assert_same_curve(losses(job_dir), losses(single))
    assert_same_weights(load_file(job_dir / "adapter" / "adapter_model.safetensors"),
                        load_file(single / "adapter" / "adapter_model.safetensors"))
    summary = json.loads((job_dir / "summary.json").read_text())
    total = json.loads((single / "summary.json").read_text())["ranks"][0]["parameters"]
    for rank in summary["ranks"]:
        share = rank["parameters"] / total
        # ZeRO-3 partitions the parameters; ZeRO-2 keeps them whole and partitions the optimizer state.
        assert abs(share - (0.5 if stage == 3 else 1.0)) < 0.02, rank
    single_optimizer = json.loads((single / "summary.json").read_text())["ranks"][0]["optimizer_state_bytes"]
    assert all(abs(r["optimizer_state_bytes"] / single_optimizer - 0.5) < 0.02 for r in summary["ranks"])


@pytest.mark.slow  # the default suite resumes sharded checkpoints after a killed rank under FSDP (above)
def test_deepspeed_resumes_from_its_zero_checkpoint_after_a_rank_dies(single, tmp_path, tiny_model_dir, tuneforge_home):
    pytest.importorskip("deepspeed")
    job_dir = job_with(tmp_path, tiny_model_dir, "zero-killed", processes=2, strategy="deepspeed",
                       resources={"deepspeed_stage": 3})
    outcome = run(job_dir, tuneforge_home, faults="kill_at_step=3,rank=0")
    assert outcome.status == "failed" and "rank 0 (local rank 0) killed by SIGKILL" in outcome.reason
    assert run(job_dir, tuneforge_home).status == "succeeded"
    assert any(e["data"].get("kind") == "resumed" and e["data"]["step"] == 2 for e in read_events(job_dir))
    assert_same_curve(losses(job_dir), losses(single))
