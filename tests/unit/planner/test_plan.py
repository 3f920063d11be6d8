"""Verdicts, recommendations, throughput, and the JobSpec entry point the API calls."""

import subprocess
import sys

import pytest

from tuneforge.planner import PRESETS, PlannerError, TrainingSetup, estimate_throughput, plan, plan_job
from tuneforge.spec import validate_job_spec


def test_a_job_that_does_not_fit_gets_a_reason_and_changes_that_fit():
    result = plan(PRESETS["llama-3-8b"], TrainingSetup(method="full", gpu="a100-40gb", micro_batch=4))
    assert not result.fits
    assert result.reason.startswith("Does not fit")
    assert "a100-40gb" in result.reason
    assert result.alternatives and all(alt.total_bytes <= result.capacity_bytes for alt in result.alternatives)
    methods = {alt.setup.method for alt in result.alternatives}
    assert methods & {"lora", "qlora"}


def test_recommendations_try_checkpointing_before_changing_the_method():
    result = plan(PRESETS["llama-3-8b"], TrainingSetup(method="lora", gpu="a100-80gb", micro_batch=4))
    assert not result.fits
    assert result.alternatives[0].setup.gradient_checkpointing
    assert result.alternatives[0].setup.method == "lora"
    # The effective batch is kept through gradient accumulation.
    for alt in result.alternatives:
        assert alt.setup.micro_batch * alt.setup.grad_accum == 4


def test_a_fitting_job_says_how_much_room_is_left():
    result = plan(PRESETS["smollm2-135m"], TrainingSetup(method="lora", gpu="a100-80gb", micro_batch=1,
                                                         gradient_checkpointing=True))
    assert result.fits and result.reason.startswith("Fits")
    assert any("micro-batch" in tip for tip in result.recommendations)


def test_throughput_uses_6n_for_full_and_4n_for_adapters():
    arch = PRESETS["llama-3-8b"]
    n = arch.active_matmul_params
    full = estimate_throughput(arch, TrainingSetup(method="full", seq_len=1))
    lora = estimate_throughput(arch, TrainingSetup(method="lora", seq_len=1))
    assert full.model_flops_per_token == pytest.approx(6 * n, rel=0.001)
    assert lora.model_flops_per_token == pytest.approx(4 * n, rel=0.01)
    with_ckpt = estimate_throughput(arch, TrainingSetup(method="full", seq_len=1, gradient_checkpointing=True))
    assert with_ckpt.hardware_flops_per_token == pytest.approx(8 * n, rel=0.001)
    hours = estimate_throughput(arch, TrainingSetup(method="full", gpu="h100-80gb"), tokens=10**9)
    assert hours.gpu_hours == pytest.approx(10**9 / hours.tokens_per_second_per_gpu / 3600)
    assert 0.3 < hours.mfu < 0.45


def test_mixtral_flops_count_only_the_active_experts():
    mixtral = estimate_throughput(PRESETS["mixtral-8x7b"], TrainingSetup(method="lora", seq_len=1))
    assert mixtral.model_flops_per_token < 4.2 * 13e9


def _spec(**sections):
    data = {"dataset": {"path": "train.jsonl", "max_seq_length": 2048}}
    data.update(sections)
    return validate_job_spec(data)


def test_plan_job_reads_the_jobspec():
    spec = _spec(model={"base_model": "smollm2-135m-instruct"}, adapter={"type": "qlora"},
                 resources={"gpu_type": "t4", "num_gpus": 2, "strategy": "fsdp"},
                 training={"per_device_batch_size": 2, "gradient_checkpointing": True})
    result = plan_job(spec)
    assert result.setup.method == "qlora" and result.setup.quantization == "nf4"
    assert result.setup.precision == "fp16"  # auto on a T4
    assert result.setup.strategy == "fsdp_full_shard"
    assert result.setup.seq_len == 2048 and result.setup.micro_batch == 2
    assert result.fits


def test_plan_job_rejects_a_70b_full_finetune_on_one_gpu_with_a_reason():
    spec = _spec(adapter={"type": "full"}, resources={"gpu_type": "h100-80gb"})
    result = plan_job(spec, "llama-3-70b")
    assert not result.fits
    assert "per device" in result.reason and "h100-80gb" in result.reason


def test_plan_job_with_any_gpu_names_the_types_it_fits_on():
    spec = _spec(adapter={"type": "qlora"}, training={"per_device_batch_size": 1, "gradient_checkpointing": True},
                 resources={"gpu_type": "any"})
    result = plan_job(spec, "llama-3-8b")
    assert result.fits and "l4" in result.fits_on and "h200" in result.fits_on


def test_plan_job_names_a_bad_model():
    with pytest.raises(PlannerError, match="expected a preset"):
        plan_job(_spec(model={"base_model": "/no/such/model"}))


def test_the_planner_imports_no_torch():
    code = "import sys, tuneforge.planner; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
