"""The verdict: does a job fit its GPUs, what to change when it does not, and how long it will take.

`plan()` takes a model and a TrainingSetup; `plan_job()` takes a JobSpec, so the CLI, the API and job
submission reject the same jobs for the same reason before anything is queued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.hardware import GPUS, GiB, device
from tuneforge.planner.memory import MemoryEstimate, estimate_memory
from tuneforge.planner.models import LINEAR_NAMES, ModelArch, load_model_arch
from tuneforge.planner.setup import TrainingSetup
from tuneforge.planner.throughput import Throughput, estimate_throughput

MAX_RECOMMENDATIONS = 4
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Alternative:
    """A changed setup that fits, and what it needs per device."""

    change: str
    setup: TrainingSetup
    total_bytes: float


@dataclass(frozen=True)
class Plan:
    model: ModelArch
    setup: TrainingSetup
    memory: MemoryEstimate
    throughput: Throughput
    capacity_bytes: float  # per device (per process for cpu jobs)
    fits: bool
    reason: str
    recommendations: list[str] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)
    fits_on: list[str] = field(default_factory=list)  # for gpu "any": the GPU types it fits on

    def to_dict(self) -> dict:
        memory = asdict(self.memory)
        return {
            "model": {"name": self.model.name, "parameters": self.model.num_params,
                      "active_parameters": self.model.active_params, "architecture": asdict(self.model)},
            "setup": asdict(self.setup),
            "memory_bytes": memory,
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
            "reason": self.reason,
            "recommendations": self.recommendations,
            "alternatives": [{"change": a.change, "total_bytes": a.total_bytes, "setup": asdict(a.setup)}
                             for a in self.alternatives],
            "fits_on": self.fits_on,
            "throughput": asdict(self.throughput),
        }


def capacity(setup: TrainingSetup) -> float:
    """Memory one training process can use: a GPU's, or this machine's RAM shared by its processes."""
    dev = device(setup.gpu)
    return dev.memory_bytes if dev.is_gpu else dev.memory_bytes / setup.num_gpus


def _gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def _largest_parts(memory: MemoryEstimate, count: int = 2) -> str:
    parts = sorted(memory.rows(), key=lambda row: row[1], reverse=True)[:count]
    return " and ".join(f"{name} ({_gib(value)})" for name, value in parts if value > 0)


def _fits(arch: ModelArch, setup: TrainingSetup) -> tuple[bool, float]:
    total = estimate_memory(arch, setup).total
    return total <= capacity(setup), total


def _candidates(setup: TrainingSetup) -> list[tuple[str, TrainingSetup]]:
    """Changes that save memory, least intrusive first; each keeps the effective batch size."""
    out: list[tuple[str, TrainingSetup]] = []
    base = setup
    if not setup.gradient_checkpointing:
        base = setup.but(gradient_checkpointing=True)
        out.append(("turn on gradient checkpointing", base))
    batch, accum = base.micro_batch, base.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        out.append((f"gradient checkpointing, micro-batch {batch} with {accum} accumulation steps",
                    base.but(micro_batch=batch, grad_accum=accum)))
    small = base.but(micro_batch=1, grad_accum=base.grad_accum * base.micro_batch)
    if setup.method == "full" and setup.optimizer == "adamw":
        out.append(("8-bit AdamW (adamw_8bit), checkpointing, micro-batch 1", small.but(optimizer="adamw_8bit")))
    if setup.world_size > 1:
        if setup.strategy in ("ddp", "zero2", "fsdp_shard_grad_op"):
            out.append(("shard everything with FSDP FULL_SHARD (or DeepSpeed ZeRO-3), checkpointing, micro-batch 1",
                        small.but(strategy="fsdp_full_shard")))
        out.append(("FSDP FULL_SHARD with CPU offload, checkpointing, micro-batch 1",
                    small.but(strategy="fsdp_full_shard", cpu_offload=True)))
    if setup.method == "full":
        out.append(("LoRA instead of full fine-tuning, checkpointing, micro-batch 1", small.but(method="lora")))
    if setup.method in ("full", "lora"):
        out.append(("QLoRA (4-bit NF4 base), checkpointing, micro-batch 1",
                    small.but(method="qlora", quantization="nf4", strategy="ddp" if setup.world_size == 1 else small.strategy,
                              cpu_offload=False)))
    return out


def _more_gpus(arch: ModelArch, setup: TrainingSetup) -> Alternative | None:
    """The fewest GPUs of the same type that fit with FSDP FULL_SHARD, checkpointing, micro-batch 1."""
    if not device(setup.gpu).is_gpu:
        return None
    small = setup.but(gradient_checkpointing=True, micro_batch=1, grad_accum=setup.grad_accum * setup.micro_batch)
    for gpus, nodes in [(g, 1) for g in (2, 4, 8)] + [(GPUS_PER_NODE, n) for n in (2, 4, 8, 16)]:
        if gpus * nodes <= setup.world_size:
            continue
        trial = small.but(num_gpus=gpus, num_nodes=nodes, strategy="fsdp_full_shard", cpu_offload=False)
        fits, total = _fits(arch, trial)
        if fits:
            where = f"{gpus} x {setup.gpu}" if nodes == 1 else f"{nodes} nodes x {gpus} {setup.gpu}"
            return Alternative(f"{where} with FSDP FULL_SHARD, checkpointing, micro-batch 1", trial, total)
    return None


def _improvements(arch: ModelArch, setup: TrainingSetup) -> list[str]:
    """For a job that fits: faster settings that still fit."""
    tips = []
    if setup.gradient_checkpointing:
        fits, total = _fits(arch, setup.but(gradient_checkpointing=False))
        if fits:
            tips.append(f"it also fits without gradient checkpointing ({_gib(total)}), which skips the recomputed forward")
    batch = setup.micro_batch
    while batch < 256 and _fits(arch, setup.but(micro_batch=batch * 2))[0]:
        batch *= 2
    if batch > setup.micro_batch:
        tips.append(f"a micro-batch of {batch} still fits ({_gib(_fits(arch, setup.but(micro_batch=batch))[1])})")
    return tips


def plan(arch: ModelArch, setup: TrainingSetup, *, tokens: int | None = None) -> Plan:
    """Memory per device, the verdict with its reason, recommendations, and throughput."""
    memory = estimate_memory(arch, setup)
    throughput = estimate_throughput(arch, setup, tokens)
    cap = capacity(setup)
    fits = memory.total <= cap
    where = "this machine's RAM" if not device(setup.gpu).is_gpu else f"an {setup.gpu}"
    if setup.gpu == "cpu" and setup.num_gpus > 1:
        where = f"this machine's RAM shared by {setup.num_gpus} processes"
    recommendations: list[str] = []
    alternatives: list[Alternative] = []
    if fits:
        reason = (
            f"Fits: {arch.name} ({setup.method}) needs {_gib(memory.total)} per device of the {_gib(cap)} of {where} "
            f"({memory.total / cap:.0%}); the largest parts are {_largest_parts(memory)}."
        )
        recommendations = _improvements(arch, setup)
    else:
        for change, candidate in _candidates(setup):
            ok, total = _fits(arch, candidate)
            if ok:
                alternatives.append(Alternative(change, candidate, total))
            if len(alternatives) >= MAX_RECOMMENDATIONS:
                break
        if len(alternatives) < MAX_RECOMMENDATIONS:
            more = _more_gpus(arch, setup)
            if more is not None:
                alternatives.append(more)
        recommendations = [f"{a.change}: {_gib(a.total_bytes)} per device" for a in alternatives]
        advice = (f" The least intrusive change that fits: {alternatives[0].change} ({_gib(alternatives[0].total_bytes)})."
                  if alternatives else " No single change tried here makes it fit; it needs more or larger GPUs.")
        reason = (
            f"Does not fit: {arch.name} ({setup.method}) needs {_gib(memory.total)} per device but {where} has "
            f"{_gib(cap)}; the largest parts are {_largest_parts(memory)}.{advice}"
        )
    if setup.cpu_offload and memory.host_offload:
        reason += f" CPU offload keeps {_gib(memory.host_offload)} per rank in host RAM ({_gib(memory.host_offload * setup.num_gpus)} per node)."
    return Plan(arch, setup, memory, throughput, cap, fits, reason, recommendations, alternatives)


def plan_any_gpu(arch: ModelArch, setup: TrainingSetup, *, tokens: int | None = None) -> Plan:
    """For gpu_type `any`: plan on the smallest GPU type it fits on, and name all that fit."""
    fitting = [name for name in GPUS if _fits(arch, setup.but(gpu=name))[0]]
    chosen = fitting[0] if fitting else max(GPUS, key=lambda name: GPUS[name].memory_bytes)
    result = plan(arch, setup.but(gpu=chosen), tokens=tokens)
    if fitting:
        reason = (f"Fits on {', '.join(fitting)} ({_gib(estimate_memory(arch, setup.but(gpu=chosen)).total)} per device "
                  f"on an {chosen}); gpu_type any runs it on whatever GPU the worker has, so a smaller one will fail.")
    else:
        reason = result.reason
    return Plan(result.model, result.setup, result.memory, result.throughput, result.capacity_bytes,
                bool(fitting), reason, result.recommendations, result.alternatives, fitting)


def setup_from_job(spec) -> TrainingSetup:
    """The TrainingSetup a JobSpec asks for ('auto' values resolved the way the engine resolves them)."""
    gpu = spec.resources.gpu_type
    precision = spec.training.precision
    if precision == "auto":
        # engine/precision.py: fp32 on CPU, bf16 where the GPU has it, fp16 on older GPUs.
        precision = "fp32" if gpu == "cpu" else ("fp16" if gpu == "t4" else "bf16")
    targets = spec.adapter.target_modules
    resources = spec.resources
    strategy = {"ddp": "ddp", "fsdp": f"fsdp_{resources.fsdp_sharding}",
                "deepspeed": f"zero{resources.deepspeed_stage}"}[resources.strategy]
    try:
        return TrainingSetup(
            method=spec.adapter.type,
            gpu="h100-80gb" if gpu == "any" else gpu,
            num_gpus=spec.resources.num_gpus,
            num_nodes=spec.resources.num_nodes,
            strategy=strategy,
            cpu_offload=resources.cpu_offload and resources.strategy != "ddp",
            optimizer=spec.training.optimizer,
            precision=precision,
            seq_len=spec.dataset.max_seq_length,
            # "auto" backs off until a micro-batch fits, so the job fits if one example does.
            micro_batch=1 if spec.training.per_device_batch_size == "auto" else spec.training.per_device_batch_size,
            grad_accum=1 if spec.training.gradient_accumulation_steps == "auto" else spec.training.gradient_accumulation_steps,
            gradient_checkpointing=spec.training.gradient_checkpointing,
            # auto is flash_attention_2 only where it is installed, which the submitter cannot know.
            attention="sdpa" if spec.model.attn_implementation == "auto" else spec.model.attn_implementation,
            quantization=spec.model.quantization,
            double_quantization=spec.model.double_quantization,
            lora_rank=spec.adapter.rank,
            lora_targets=LINEAR_NAMES if targets == "all-linear" else tuple(targets),
            lora_dropout=spec.adapter.dropout,
            **({"vision_tower": spec.vision.vision_tower, "projector": spec.vision.projector}
               if spec.method == "vlm" else {}),
        )
    except PlannerError as exc:
        raise PlannerError(f"job spec: {exc}") from None


def plan_job(spec, model: str | ModelArch | None = None, *, tokens: int | None = None,
             images_per_example: int | None = None) -> Plan:
    """Plan a JobSpec; `model` defaults to its model.base_model (a preset name or a model directory).

    Every sequence is planned at dataset.max_seq_length and every position as carrying loss: the
    worst case of the job, which is what must fit. A VLM's examples hold as many images as fit that length
    unless `images_per_example` says how many (a dataset's count, for a cost estimate).
    """
    arch = model if isinstance(model, ModelArch) else load_model_arch(model or spec.model.base_model)
    setup = setup_from_job(spec)
    if arch.vision is not None and spec.method == "vlm":
        setup = setup.but(images_per_example=images_per_example or arch.vision.most_images(setup.seq_len))
    if spec.resources.gpu_type == "any":
        return plan_any_gpu(arch, setup, tokens=tokens)
    return plan(arch, setup, tokens=tokens)
