"""The accelerators a job can ask for (spec.job.GpuType): memory, peak dense FLOP/s, and bf16 support.

Memory is the total nvidia-smi reports for the card (what torch can ever see); the FLOP/s are the
vendors' dense (no sparsity) tensor-core peaks from their datasheets, SXM parts where there are two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tuneforge.planner.errors import PlannerError

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    peak_flops: float | None  # dense bf16 (fp16 where there is no bf16); None: no published peak
    bf16: bool
    is_gpu: bool = True


GPUS: dict[str, Device] = {
    "t4": Device("t4", 15360 * MiB, 65e12, bf16=False),  # Turing: fp16 tensor cores only
    "l4": Device("l4", 23034 * MiB, 121e12, bf16=True),
    "a10g": Device("a10g", 23028 * MiB, 125e12, bf16=True),  # A10 datasheet figure; AWS publishes none for A10G
    "a100-40gb": Device("a100-40gb", 40960 * MiB, 312e12, bf16=True),
    "a100-80gb": Device("a100-80gb", 81920 * MiB, 312e12, bf16=True),
    "h100-80gb": Device("h100-80gb", 81559 * MiB, 989e12, bf16=True),
    "h200": Device("h200", 143771 * MiB, 989e12, bf16=True),
    "b200": Device("b200", 183359 * MiB, 2250e12, bf16=True),
}


def host_memory_bytes() -> int:
    """This machine's RAM: what a `cpu` job can use when it runs here."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device(name: str) -> Device:
    """A GPU type of JobSpec, or `cpu` (this machine's RAM, no throughput estimate)."""
    if name == "cpu":
        return Device("cpu", host_memory_bytes(), None, bf16=True, is_gpu=False)
    if name not in GPUS:
        raise PlannerError(f"gpu {name!r}: expected one of cpu, {', '.join(GPUS)}")
    return GPUS[name]
