"""The planner against published figures (docs/planner.md has the sources) and the rules its terms follow."""

import pytest

from tuneforge.planner import PRESETS, PlannerError, TrainingSetup, estimate_memory, plan
from tuneforge.planner.memory import quantized_bytes_per_param

GB, GiB = 1e9, 1 << 30


def test_full_finetuning_with_adamw_in_mixed_precision_is_16_to_18_bytes_per_parameter():
    arch = PRESETS["llama-3-8b"]
    m = estimate_memory(arch, TrainingSetup(method="full", precision="bf16", optimizer="adamw"))
    states = (m.weights + m.gradients + m.optimizer) / arch.num_params
    with_autocast_copies = states + m.detail["buffers"]["autocast weight copies"] / arch.num_params
    assert states == pytest.approx(16.0, abs=0.01)
    assert 16.0 <= with_autocast_copies <= 18.0


def test_qlora_70b_fits_in_41_to_48_gb():
    # The QLoRA paper's setting: one GPU, micro-batch 1, gradient checkpointing, paged 8-bit optimizer.
    setup = TrainingSetup(method="qlora", gpu="a100-80gb", seq_len=512, micro_batch=1, gradient_checkpointing=True,
                          optimizer="paged_adamw_8bit", lora_rank=16)
    m = estimate_memory(PRESETS["llama-3-70b"], setup)
    # "A single 48GB GPU" (A40 / RTX A6000: 49,140 MiB) holds 48 GiB; with the CUDA context and the
    # allocator's slack the job must still fit in it.
    assert 41 * GB <= m.peak_allocated <= 48 * GiB
    assert m.total <= 48 * GiB


def test_nf4_with_double_quantization_costs_about_half_a_byte_per_weight():
    assert quantized_bytes_per_param(TrainingSetup(method="qlora")) == pytest.approx(0.5 + 0.127 / 8, abs=1e-3)
    single = quantized_bytes_per_param(TrainingSetup(method="qlora", double_quantization=False))
    assert single == pytest.approx(0.5 + 0.5 / 8)


def test_70b_full_finetune_on_8_a100_80gb_needs_fsdp_with_cpu_offload():
    arch = PRESETS["llama-3-70b"]
    base = TrainingSetup(method="full", gpu="a100-80gb", num_gpus=8, seq_len=2048, micro_batch=1,
                         gradient_checkpointing=True)
    assert not plan(arch, base.but(strategy="ddp")).fits
    assert not plan(arch, base.but(strategy="fsdp")).fits  # 16 bytes x 70.6B / 8 = 141 GB of states per GPU
    offloaded = plan(arch, base.but(strategy="fsdp", cpu_offload=True))
    assert offloaded.fits
    assert offloaded.memory.host_offload * 8 == pytest.approx(16 * arch.num_params, rel=0.01)
    # Two nodes (the HF blog's hardware) fit without offload.
    assert plan(arch, base.but(strategy="fsdp", num_nodes=2)).fits


def test_lora_8b_fits_a_24gb_gpu_with_checkpointing():
    arch = PRESETS["llama-3-8b"]
    setup = TrainingSetup(method="lora", gpu="l4", seq_len=2048, micro_batch=1, gradient_checkpointing=True)
    result = plan(arch, setup)
    assert result.fits
    assert 16 * GiB < result.memory.peak_allocated < 22 * GiB


def test_sharding_divides_states_by_the_shard_group():
    arch = PRESETS["llama-3-8b"]
    one = estimate_memory(arch, TrainingSetup(method="full", num_gpus=8, strategy="ddp"))
    full_shard = estimate_memory(arch, TrainingSetup(method="full", num_gpus=8, strategy="fsdp"))
    hybrid = estimate_memory(arch, TrainingSetup(method="full", num_gpus=4, num_nodes=2, strategy="fsdp-hybrid"))
    zero2 = estimate_memory(arch, TrainingSetup(method="full", num_gpus=8, strategy="zero2"))
    assert full_shard.optimizer == pytest.approx(one.optimizer / 8)
    assert hybrid.optimizer == pytest.approx(one.optimizer / 4)  # sharded within a node of 4
    assert zero2.optimizer == pytest.approx(one.optimizer / 8)
    assert zero2.weights > full_shard.weights  # ZeRO-2 keeps the whole working copy of the weights
    assert "DDP gradient buckets" in one.detail["buffers"]


def test_gradient_checkpointing_cuts_activations_and_attention_kernels_differ():
    arch = PRESETS["llama-3-8b"]
    setup = TrainingSetup(method="lora", seq_len=4096, micro_batch=2)
    plain = estimate_memory(arch, setup)
    assert plain.activations_with_checkpointing < plain.activations_without_checkpointing / 5
    eager = estimate_memory(arch, setup.but(attention="eager")).activations
    flash = estimate_memory(arch, setup.but(attention="flash_attention_2")).activations
    assert flash < plain.activations < eager  # eager keeps seq x seq scores; flash needs no mask, no K/V repeat


def test_full_finetuning_saves_more_activations_than_lora():
    arch = PRESETS["mistral-7b"]
    lora = estimate_memory(arch, TrainingSetup(method="lora", lora_dropout=0.0)).activations
    full = estimate_memory(arch, TrainingSetup(method="full")).activations
    assert full > lora  # frozen projections keep no inputs for weight gradients


def test_the_loss_only_ever_holds_one_chunk_of_float32_logits():
    arch = PRESETS["qwen2.5-7b"]  # 152k vocabulary
    short = estimate_memory(arch, TrainingSetup(method="lora", seq_len=512, micro_batch=1)).logits
    long = estimate_memory(arch, TrainingSetup(method="lora", seq_len=32768, micro_batch=8)).logits
    chunk = 8 * (1 << 25)
    hidden = 2 * 8 * 32767 * arch.hidden_size * 2
    assert long <= chunk + hidden + 1
    # The full float32 logits of that batch would be 8 x 32k x 152k x 4 bytes = 160 GB.
    assert long < 8 * 32768 * arch.vocab_size * 4 / 25
    assert short < long


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"])
def test_optimizer_state_per_trainable_parameter(optimizer):
    arch = PRESETS["llama-3-8b"]
    m = estimate_memory(arch, TrainingSetup(method="full", optimizer=optimizer))
    per_param = m.optimizer / m.trainable_params
    expected = {"adamw": (8, 8), "adamw_8bit": (2, 2.1), "paged_adamw_8bit": (2, 2.1), "adafactor": (0, 0.05),
                "sgd": (4, 4)}[optimizer]
    assert expected[0] <= per_param <= expected[1]


def test_mixtral_qlora_keeps_every_expert_quantized_in_memory():
    mixtral = PRESETS["mixtral-8x7b"]
    m = estimate_memory(mixtral, TrainingSetup(method="qlora", micro_batch=1, gradient_checkpointing=True))
    assert m.weights > 0.5 * mixtral.quantizable_params


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "dora"}, "method 'dora': expected one of lora, qlora, full"),
        ({"micro_batch": 0}, "micro_batch: expected a positive integer"),
        ({"strategy": "tensor-parallel"}, "expected one of ddp"),
        ({"cpu_offload": True}, "cpu offload needs a sharded strategy"),
        ({"method": "full", "quantization": "nf4"}, "cannot use a quantized base"),
        ({"lora_targets": ("c_attn",)}, "expected names among"),
        ({"loss_fraction": 0.0}, "loss_fraction"),
    ],
)
def test_nonsense_setups_are_refused(changes, message):
    with pytest.raises(PlannerError, match=message):
        TrainingSetup(**changes)
