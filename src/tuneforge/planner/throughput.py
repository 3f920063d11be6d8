"""Training FLOPs per token and the tokens/s and GPU-hours they imply at a realistic MFU.

Model FLOPs per token: 6N for full fine-tuning (forward 2N, backward 4N), 4N for LoRA / QLoRA (a frozen
weight needs no weight gradient, only the input gradient), plus attention's 12 * layers * width * seq
(PaLM, appendix B); N counts the parameters multiplied per token (top-k experts only).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.planner.hardware import device
from tuneforge.planner.models import ModelArch
from tuneforge.planner.setup import TrainingSetup

# Model-FLOPs utilization of well-tuned fine-tuning runs in bf16 on one node (published MFUs of
# FSDP / DeepSpeed full fine-tuning are 35-55%; adapters run smaller matmuls, QLoRA also dequantizes).
MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
OFFLOAD_SLOWDOWN = 0.6  # the optimizer step on the host and parameters over PCIe
MULTI_NODE_EFFICIENCY = 0.9  # inter-node all-gathers / all-reduces are only partly hidden


@dataclass(frozen=True)
class Throughput:
    model_flops_per_token: float
    hardware_flops_per_token: float  # + the recomputed forward under gradient checkpointing
    mfu: float | None
    tokens_per_second_per_gpu: float | None
    tokens_per_second: float | None
    gpu_hours: float | None  # for `tokens`, when given
    tokens: int | None


def flops_per_token(arch: ModelArch, setup: TrainingSetup) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token."""
    n = arch.active_matmul_params
    attention_forward = 4 * arch.num_layers * arch.q_width * setup.seq_len
    forward = 2 * n + attention_forward
    weight_multiplier = 6 if setup.method == "full" else 4
    model = weight_multiplier * n + 3 * attention_forward
    if setup.trains_adapters:
        rank = setup.lora_rank
        lora = sum(
            rank * (linear.in_features + linear.out_features) * (arch.experts_per_token if linear.copies > 1 else 1)
            for linear in arch.layer_linears() if linear.name in setup.lora_targets
        ) * arch.num_layers
        model += 6 * lora
    if arch.vision is not None:  # a VLM's tower and projector, spread over the language model's positions
        from tuneforge.planner.vision import flops_per_token as image_flops

        image = image_flops(arch.vision, setup)
        model += image
        # Checkpointing recomputes a trained tower's forward; a frozen one runs without a graph to checkpoint.
        if setup.vision_tower == "trained":
            forward += image / (3 if setup.method == "full" else 2)
    hardware = model + (forward if setup.gradient_checkpointing else 0)
    return model, hardware


def estimate_throughput(arch: ModelArch, setup: TrainingSetup, tokens: int | None = None) -> Throughput:
    model_flops, hardware_flops = flops_per_token(arch, setup)
    gpu = device(setup.gpu)
    if gpu.peak_flops is None:
        return Throughput(model_flops, hardware_flops, None, None, None, None, tokens)
    # fp32 runs plain float32 matmuls (tuneforge leaves TF32 off): 1/16 of the bf16 peak, 1/8 on a T4.
    peak = gpu.peak_flops * (1.0 if setup.mixed else 0.125 if gpu.name == "t4" else 1 / 16)
    utilization = MFU[setup.method] * (OFFLOAD_SLOWDOWN if setup.cpu_offload else 1.0)
    if setup.num_nodes > 1:
        utilization *= MULTI_NODE_EFFICIENCY
    # The utilization is of the hardware FLOPs actually executed; the MFU reported counts model FLOPs.
    per_gpu = peak * utilization / hardware_flops
    mfu = per_gpu * model_flops / peak
    total = per_gpu * setup.world_size
    gpu_hours = tokens / per_gpu / 3600 if tokens else None
    return Throughput(model_flops, hardware_flops, mfu, per_gpu, total, gpu_hours, tokens)
