"""What is planned: method, optimizer, precision, shapes, strategy and hardware of one training job.

`TrainingSetup` is plain data with the choices the JobSpec offers (same names), plus the strategy
variants a JobSpec's `resources.strategy` stands for (FSDP sharding modes, ZeRO stages, CPU offload).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.models import LINEAR_NAMES

METHODS = ("lora", "qlora", "full")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "flash_attention_2", "eager")
QUANTIZATION = ("none", "int8", "nf4", "fp4")
# ddp replicates everything; the others shard over `shard_group` ranks (see Strategy).
STRATEGIES = ("ddp", "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_hybrid_shard", "zero2", "zero3")
STRATEGY_ALIASES = {
    "fsdp": "fsdp_full_shard",
    "fsdp-full-shard": "fsdp_full_shard",
    "full_shard": "fsdp_full_shard",
    "fsdp-shard-grad-op": "fsdp_shard_grad_op",
    "shard_grad_op": "fsdp_shard_grad_op",
    "fsdp-hybrid": "fsdp_hybrid_shard",
    "fsdp_hybrid": "fsdp_hybrid_shard",
    "hybrid_shard": "fsdp_hybrid_shard",
    "deepspeed": "zero3",
    "zero-2": "zero2",
    "zero-3": "zero3",
    "deepspeed-zero2": "zero2",
    "deepspeed-zero3": "zero3",
}


def canonical_strategy(name: str) -> str:
    key = STRATEGY_ALIASES.get(name.lower(), name.lower())
    if key not in STRATEGIES:
        raise PlannerError(f"strategy {name!r}: expected one of {', '.join(STRATEGIES)} (or fsdp, deepspeed)")
    return key


@dataclass(frozen=True)
class TrainingSetup:
    method: str = "lora"
    gpu: str = "a100-80gb"
    num_gpus: int = 1
    num_nodes: int = 1
    strategy: str = "ddp"
    cpu_offload: bool = False
    optimizer: str = "adamw"
    precision: str = "bf16"
    seq_len: int = 2048
    micro_batch: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    # Fraction of positions that carry loss (assistant tokens in chat SFT); the loss skips the rest.
    loss_fraction: float = 1.0
    quantization: str = "none"  # of the frozen base: qlora implies nf4
    double_quantization: bool = True
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = field(default=LINEAR_NAMES)
    lora_dropout: float = 0.05
    # A vision-language model's images (planner/vision.py): how many per example, and which parts train.
    images_per_example: int = 0
    vision_tower: str = "frozen"
    projector: str = "trained"

    def __post_init__(self):
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise PlannerError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

        choice("method", METHODS)
        choice("optimizer", OPTIMIZERS)
        choice("precision", PRECISIONS)
        choice("attention", ATTENTION)
        choice("quantization", QUANTIZATION)
        choice("vision_tower", ("frozen", "trained"))
        choice("projector", ("trained", "frozen"))
        if isinstance(self.images_per_example, bool) or not isinstance(self.images_per_example, int) \
                or self.images_per_example < 0:
            raise PlannerError(f"images_per_example: expected a count of 0 or more, found {self.images_per_example!r}")
        object.__setattr__(self, "strategy", canonical_strategy(self.strategy))
        for name in ("num_gpus", "num_nodes", "seq_len", "micro_batch", "grad_accum", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlannerError(f"{name}: expected a positive integer, found {value!r}")
        if self.seq_len > 1 << 22:
            raise PlannerError(f"seq_len: expected at most {1 << 22} tokens, found {self.seq_len}")
        if not 0.0 < self.loss_fraction <= 1.0:
            raise PlannerError(f"loss_fraction: expected a fraction in (0, 1], found {self.loss_fraction!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PlannerError(f"lora_dropout: expected a value in [0, 1), found {self.lora_dropout!r}")
        unknown = [name for name in self.lora_targets if name not in LINEAR_NAMES]
        if unknown or not self.lora_targets:
            raise PlannerError(
                f"lora targets {list(self.lora_targets)!r}: expected names among {', '.join(LINEAR_NAMES)} or all-linear"
            )
        if self.method == "qlora" and self.quantization not in ("nf4", "fp4"):
            if self.quantization == "int8":
                raise PlannerError("method qlora needs a 4-bit base: quantization nf4 or fp4, not int8")
            object.__setattr__(self, "quantization", "nf4")
        if self.method == "full" and self.quantization != "none":
            raise PlannerError(f"method full trains every weight and cannot use a quantized base ({self.quantization})")
        if self.cpu_offload and self.strategy == "ddp":
            raise PlannerError("cpu offload needs a sharded strategy (fsdp or deepspeed), not ddp")

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    @property
    def shard_group(self) -> int:
        """Ranks one copy of the sharded state is spread over: all of them, or one node for HYBRID_SHARD."""
        if self.strategy == "ddp":
            return 1
        return self.num_gpus if self.strategy == "fsdp_hybrid_shard" else self.world_size

    @property
    def shards_parameters(self) -> bool:
        """FULL_SHARD / HYBRID_SHARD / ZeRO-3 keep only a shard of the weights between uses."""
        return self.strategy in ("fsdp_full_shard", "fsdp_hybrid_shard", "zero3")

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def trains_adapters(self) -> bool:
        return self.method in ("lora", "qlora")

    def but(self, **changes) -> TrainingSetup:
        """A copy with some choices changed (validated again)."""
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [self.method]
        if self.quantized:
            parts.append(f"{self.quantization} base")
        parts += [self.optimizer, self.precision, f"seq {self.seq_len}", f"micro-batch {self.micro_batch}"]
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        parts.append(f"{self.strategy}{' + cpu offload' if self.cpu_offload else ''}")
        parts.append(f"{self.num_nodes} x {self.num_gpus} {self.gpu}")
        return ", ".join(parts)
