"""The host RAM a job needs per node: loading the whole model on every rank costs the model per process,
sharded loading about the model / processes; a job whose node RAM is too small is refused at submission."""

from __future__ import annotations

import pytest

from tuneforge.planner import plan_job
from tuneforge.planner.hardware import GiB
from tuneforge.planner.host_memory import PROCESS_BYTES, job_host_memory, sharded_load
from tuneforge.scheduler.submission import check_submission
from tuneforge.spec import validate_job_spec

NODE = {"gpu_type": "h100-80gb", "gpus": 8, "strategies": ["ddp", "fsdp", "deepspeed"], "reporters": []}
WORKERS = [{"worker": "w-ray", "executor": "ray", "nodes": [NODE]}]


def spec_70b(**resources):
    return validate_job_spec({"model": {"base_model": "llama-3-70b"},
                              "dataset": {"path": "file-1", "max_seq_length": 1024},
                              "training": {"per_device_batch_size": 1, "gradient_checkpointing": True},
                              "resources": {"num_gpus": 8, "gpu_type": "h100-80gb", "strategy": "fsdp", **resources}})


def test_sharded_loading_needs_the_model_over_the_ranks_not_the_model_per_rank():
    whole_spec, sharded_spec = spec_70b(model_loading="whole"), spec_70b()
    whole = job_host_memory(whole_spec, plan_job(whole_spec))
    sharded = job_host_memory(sharded_spec, plan_job(sharded_spec))
    weights = plan_job(sharded_spec).model.num_params * 2  # bf16 under LoRA
    assert not whole.sharded_load and sharded.sharded_load
    assert whole.load_per_rank > weights  # ~141 GB in every process
    embedding = 128256 * 8192 * 2
    assert sharded.load_per_rank == pytest.approx(PROCESS_BYTES + weights / 8 + 2 * embedding)
    # ZeRO-3's ranks read their partitions the same way (bench/load_memory.py measured both within it).
    zero3_spec = spec_70b(strategy="deepspeed", deepspeed_stage=3)
    assert job_host_memory(zero3_spec, plan_job(zero3_spec)).load_per_rank == pytest.approx(sharded.load_per_rank)
    assert whole.per_node == pytest.approx(8 * whole.load_per_rank) and whole.per_node > 1000 * GiB
    assert sharded.per_node < 200 * GiB
    assert whole.capacity is None and whole.fits  # nothing declared, not a local job: reported, not checked


def test_which_jobs_load_sharded():
    assert sharded_load(spec_70b(), 8)
    assert not sharded_load(spec_70b(), 1)
    assert not sharded_load(spec_70b(strategy="ddp"), 8)
    assert not sharded_load(spec_70b(strategy="deepspeed", deepspeed_stage=2), 8)
    assert sharded_load(spec_70b(strategy="deepspeed", deepspeed_stage=3), 8)
    assert sharded_load(spec_70b(strategy="deepspeed", deepspeed_config={"zero_optimization": {"stage": 3}}), 8)
    # DeepSpeed quantizes frozen partitions only as it partitions a loaded model: that config loads whole.
    quantizing = {"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}}
    assert not sharded_load(spec_70b(strategy="deepspeed", deepspeed_config=quantizing), 8)
    quantized = validate_job_spec({"model": {"base_model": "llama-3-70b", "quantization": "nf4"}, "adapter": {"type": "qlora"},
                                   "dataset": {"path": "file-1"},
                                   "resources": {"num_gpus": 8, "gpu_type": "h100-80gb", "strategy": "fsdp"}})
    assert not sharded_load(quantized, 8)  # transformers quantizes tensor by tensor as it loads the whole base


def test_a_job_whose_nodes_lack_the_host_ram_is_refused_with_the_reason_and_the_fix():
    check = check_submission(spec_70b(model_loading="whole", host_memory_gb=512), WORKERS)
    assert check.problem is not None and check.problem.code == "insufficient_host_memory"
    message = check.problem.message
    assert "512.0 GiB of resources.host_memory_gb" in message and "each rank loading the whole model" in message
    assert "model_loading to auto" in message
    assert check.memory["host_memory"]["per_node"] > 512 * GiB
    # The same node RAM holds the sharded load.
    assert check_submission(spec_70b(host_memory_gb=512), WORKERS).problem is None


def test_a_local_job_is_checked_against_this_machines_ram(monkeypatch):
    monkeypatch.setattr("tuneforge.planner.hardware.host_memory_bytes", lambda: 16 * GiB)
    local = [{"worker": "w-local", "executor": "local", "nodes": [NODE]}]
    check = check_submission(spec_70b(), local)
    assert check.problem is not None and check.problem.code == "insufficient_host_memory"
    assert "16.0 GiB of RAM on this machine" in check.problem.message
