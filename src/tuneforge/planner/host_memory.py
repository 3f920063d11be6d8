"""Host RAM a job needs on each node: its processes' peak while they load the base model, or what they
keep there while training (a CPU job's whole state, CPU offload's shards), whichever is larger.

Loading is the peak that used to decide it: every rank loading the whole model before sharding holds
the model once per process (140 GB each for a 70B base). Sharded loading (engine/sharded_loading.py)
holds about the model / processes plus one tensor in flight; bench/load_memory.py measures both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tuneforge.planner.hardware import GiB
from tuneforge.planner.memory import MemoryEstimate
from tuneforge.planner.models import ModelArch
from tuneforge.planner.setup import TrainingSetup

# Python, torch, transformers and the tokenized data in one process before any weight: measured here as
# ~0.75 GiB of peak resident set after the imports (bench/load_memory.py prints it per rank).
PROCESS_BYTES = 1.0 * GiB
QUANTIZED_BYTES = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}


def sharded_load(spec, world_size: int) -> bool:
    """Whether a job's ranks load only their shards (the engine asks the same): FSDP or ZeRO-3 over
    several processes, a full-precision base, resources.model_loading auto. A ZeRO-3 config that keeps
    frozen weights quantized in their partitions (zero_quantized_nontrainable_weights) loads whole:
    DeepSpeed quantizes them as it partitions a loaded model, the partition reader copies values."""
    r = spec.resources
    if world_size < 2 or r.model_loading != "auto" or spec.model.quantization != "none":
        return False
    if r.strategy == "fsdp":
        return True
    zero = (r.deepspeed_config.get("zero_optimization") or {}) if r.deepspeed_config else {}
    stage = zero.get("stage", 0) if r.deepspeed_config else r.deepspeed_stage
    return r.strategy == "deepspeed" and int(stage) == 3 and not zero.get("zero_quantized_nontrainable_weights")


@dataclass(frozen=True)
class HostMemory:
    sharded_load: bool
    load_per_rank: float  # bytes: peak of one process while it loads the model
    train_per_rank: float  # bytes one process keeps in host RAM while it trains
    per_node: float  # the larger of the two, times the node's processes
    capacity: float | None  # bytes of RAM per node the job may use; None: not known, not checked
    capacity_source: str  # "resources.host_memory_gb", "this machine", or "" when unknown

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.per_node <= self.capacity

    def reason(self) -> str:
        how = "each rank reading only its shard" if self.sharded_load else "each rank loading the whole model"
        need = (f"needs {self.per_node / GiB:.1f} GiB of host RAM per node ({how}: {self.load_per_rank / GiB:.1f} "
                f"GiB per process while loading, {self.train_per_rank / GiB:.1f} GiB while training)")
        if self.capacity is None:
            return f"the job {need}; host RAM is not checked (set resources.host_memory_gb to check it)"
        verdict = "fits" if self.fits else "does not fit"
        return f"the job {need}: {verdict} the {self.capacity / GiB:.1f} GiB of {self.capacity_source}"

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "reason": self.reason()}


def weight_bytes(model: ModelArch, setup: TrainingSetup) -> float:
    """The base model's weights as a process holds them: float32 for full fine-tuning, the compute dtype
    under an adapter, the packed 4-/8-bit layers of a quantized base."""
    per_param = 4 if setup.method == "full" or setup.precision == "fp32" else 2
    if setup.quantization in QUANTIZED_BYTES:
        quantized = model.quantizable_params
        return quantized * QUANTIZED_BYTES[setup.quantization] + (model.num_params - quantized) * per_param
    return model.num_params * per_param


def load_bytes_per_rank(model: ModelArch, setup: TrainingSetup, *, sharded: bool) -> float:
    """One process's peak while loading. Whole: the model plus one tensor in flight. Sharded: its shard
    plus the largest tensor twice (FSDP: the file's pages while it is read and the copy that is sliced;
    ZeRO-3: zero.Init's whole parameter while it is partitioned, and the freed blocks allocators keep;
    measured on a ~1.1B model: shard + 0.8 to 1.5 times its 192 MiB embedding under both)."""
    per_param = 4 if setup.method == "full" or setup.precision == "fp32" else 2
    largest = model.embedding_params * per_param  # the largest tensor of a Llama-family checkpoint
    weights = weight_bytes(model, setup)
    if not sharded:
        return PROCESS_BYTES + weights + largest
    group = setup.num_gpus if setup.strategy == "fsdp_hybrid_shard" else setup.world_size
    return PROCESS_BYTES + weights / group + 2 * largest


def host_memory(model: ModelArch, setup: TrainingSetup, memory: MemoryEstimate, *, sharded: bool,
                capacity: float | None, capacity_source: str = "") -> HostMemory:
    """The host RAM need per node. On a `cpu` job the planner's per-process total is host memory; on
    GPUs only what CPU offload keeps there (plus the process itself)."""
    load = load_bytes_per_rank(model, setup, sharded=sharded)
    train = PROCESS_BYTES + (memory.total if setup.gpu == "cpu" else memory.host_offload)
    return HostMemory(sharded_load=sharded, load_per_rank=load, train_per_rank=train,
                      per_node=max(load, train) * setup.num_gpus, capacity=capacity, capacity_source=capacity_source)


def job_host_memory(spec, plan, *, local_machine: bool = False) -> HostMemory:
    """A JobSpec's host RAM need per node from its plan (plan_job's), checked against
    resources.host_memory_gb, or this machine's RAM for a cpu job or one that only local workers can run
    (local_machine); unchecked otherwise."""
    from tuneforge.planner.hardware import host_memory_bytes

    declared = spec.resources.host_memory_gb
    if declared is not None:
        capacity, source = declared * GiB, "resources.host_memory_gb"
    elif spec.resources.gpu_type == "cpu" or local_machine:
        capacity, source = float(host_memory_bytes()) or None, "RAM on this machine"
    else:
        capacity, source = None, ""
    return host_memory(plan.model, plan.setup, plan.memory, sharded=sharded_load(spec, plan.setup.world_size),
                       capacity=capacity, capacity_source=source)
