"""Pick the largest micro-batch that fits, and shrink it when a step runs out of memory.

On a GPU the pick is measured: forward and backward on the longest examples of the dataset, with the
optimizer state's memory held back, halving until it fits. On a CPU an out-of-memory kill cannot be
caught, so the pick comes from the memory planner against the machine's available RAM. Either way the
effective batch (examples per optimizer step) never changes: a smaller micro-batch only means more
accumulation, and the loss is normalized per step, so the result is the same.
"""

from __future__ import annotations

import math

import torch


CPU_MEMORY_FRACTION = 0.7  # leave room for the page cache, the data and the rest of the machine
GPU_MEMORY_FRACTION = 0.9  # the planner is within ~10% of measured on GPUs (docs/planner.md)


def optimizer_state_bytes(parameters: list[torch.nn.Parameter], optimizer_name: str) -> int:
    """Memory the optimizer will allocate at its first step (not yet there while probing)."""
    numel = sum(p.numel() for p in parameters)
    per_value = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 0, "adafactor": 1, "sgd": 4}[optimizer_name]
    return numel * per_value + numel * 4  # + the gradients themselves


def probe_cuda(loss_module, worst_batch, target: int, *, precision, reserve_bytes: int) -> int:
    """Largest micro-batch <= target whose forward and backward fit on the GPU.

    worst_batch(n) collates the n longest units of the dataset (the worst case for memory)."""
    micro = target
    while True:
        try:
            reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=precision.device)
            batch = {k: v.to(precision.device) for k, v in worst_batch(micro).items() if k != "tokens" and v is not None}
            with precision.autocast():
                loss = loss_module(**batch)[0]
            loss.backward()
            del reserve, batch, loss
            return micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro = max(1, micro // 2)
        finally:
            loss_module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


def plan_micro_batch(spec, model_dir, target: int, *, device_type: str = "cpu") -> int:
    """Largest micro-batch <= target that the planner expects to fit in one rank's memory.

    On a CPU that is this machine's available RAM shared by the node's processes; on GPUs (used when
    several processes train: an out-of-memory on one rank cannot be retried without the others) the
    device's memory."""
    from tuneforge.planner import PlannerError, load_model_arch, plan, setup_from_job

    gpu_type = "cpu" if device_type == "cpu" else spec.resources.gpu_type
    try:
        arch = load_model_arch(str(model_dir))
        base = setup_from_job(spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpu_type": gpu_type})}))
    except PlannerError:
        return target  # an architecture the planner does not know: trust the target, back off on failure
    if device_type == "cpu":
        budget = _available_ram() * CPU_MEMORY_FRACTION / spec.resources.num_gpus
    else:
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * GPU_MEMORY_FRACTION
    micro = target
    while micro > 1:
        estimate = plan(arch, base.but(micro_batch=micro, grad_accum=1)).memory.total
        if estimate <= budget:
            break
        micro = max(1, micro // 2)
    return micro


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pick_micro_batch(spec, *, loss_module, batcher, model_dir, parallel, device, precision) -> int:
    """The micro-batch for `per_device_batch_size: auto`: measured on one GPU (forward and backward on
    the batcher's longest units), from the planner otherwise. Several ranks cannot probe (an
    out-of-memory on one strands the others in a collective): the smallest answer of any rank wins."""
    target = -(-spec.training.batch_size // parallel.world_size)  # this device's share of a step
    if device.type == "cuda" and not parallel.enabled:
        lengths = batcher.unit_lengths()
        longest = sorted(range(len(batcher)), key=lambda u: -lengths[u])[:target]
        trainable = [p for p in loss_module.parameters() if p.requires_grad]
        return probe_cuda(loss_module, lambda n: batcher.collate(longest[:n]), target, precision=precision,
                          reserve_bytes=optimizer_state_bytes(trainable, spec.training.optimizer))
    return min(parallel.gather(plan_micro_batch(spec, model_dir, target, device_type=device.type)))


def accumulation_for(per_device_examples: int, micro: int) -> int:
    return math.ceil(per_device_examples / micro)
