"""System sampling and the MFU estimate that each step's metrics event carries.

A daemon thread samples every `monitoring.sample_interval_s`: each visible GPU through NVML (utilization,
memory used, power), or without a GPU the recipe process's CPU % and resident memory. The training loop
takes what was sampled since its last metrics event (mean utilization and power, peak memory) and writes
it with the step, so sampling never waits on training and training only swaps a dict under a lock.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import psutil
import torch

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.hardware import GPUS
from tuneforge.planner.models import load_model_arch
from tuneforge.planner.plan import setup_from_job
from tuneforge.planner.throughput import flops_per_token

log = logging.getLogger("tuneforge.monitoring")

# torch.cuda.get_device_name() fragments -> planner/hardware.py's GPU types (the first match wins).
_GPU_NAMES = (("h200", "h200"), ("h100", "h100-80gb"), ("b200", "b200"), ("a100", "a100-80gb"),
              ("a10g", "a10g"), ("l4", "l4"), ("t4", "t4"))


def gpu_type_of(name: str, memory_bytes: int) -> str | None:
    """The planner's GPU type of a CUDA device name ("NVIDIA H200", "A100-SXM4-40GB"), None if unknown."""
    lowered = name.lower()
    for fragment, gpu in _GPU_NAMES:
        if fragment in lowered:
            if gpu == "a100-80gb" and memory_bytes < GPUS["a100-40gb"].memory_bytes * 1.2:
                return "a100-40gb"
            return gpu
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one training device at this precision, from the datasheet table; None on a CPU
    or an unknown GPU. fp32 runs plain float32 matmuls (TF32 stays off): 1/16 of the bf16 peak (T4: 1/8)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    gpu = gpu_type_of(props.name, props.total_memory)
    if gpu is None or GPUS[gpu].peak_flops is None:
        return None
    scale = 1.0 if precision in ("bf16", "fp16") else 0.125 if gpu == "t4" else 1 / 16
    return GPUS[gpu].peak_flops * scale


class MfuEstimator:
    """Model-FLOPs utilization: the planner's model FLOPs per token x tokens/s over the devices' peak.

    FLOPs per token are linear in the sequence length (attention's term), so two points give every length."""

    def __init__(self, spec, device: torch.device, precision: str, world_size: int):
        self.peak = spec.monitoring.peak_flops or device_peak_flops(device, precision)
        self.world_size = world_size
        self.base = self.per_position = None
        if self.peak is None:
            return
        try:
            arch = load_model_arch(spec.model.base_model)
            setup = setup_from_job(spec)
            one, two = (flops_per_token(arch, setup.but(seq_len=n))[0] for n in (1, 2))
        except (PlannerError, ValueError, TypeError) as exc:  # a model the planner cannot describe: no MFU
            log.info("no MFU estimate: %s", exc)
            self.peak = None
            return
        self.base, self.per_position = 2 * one - two, two - one

    def mfu(self, tokens_per_second: float, seq_len: float) -> float | None:
        if self.peak is None or not math.isfinite(tokens_per_second):
            return None
        flops = self.base + self.per_position * seq_len
        return tokens_per_second * flops / (self.peak * self.world_size)


def step_memory(device: torch.device, process: psutil.Process) -> dict[str, int]:
    """This process's memory now: the CUDA caching allocator's allocated and peak bytes, or the resident set."""
    if device.type == "cuda":
        return {"memory_allocated_bytes": torch.cuda.memory_allocated(device),
                "memory_peak_bytes": torch.cuda.max_memory_allocated(device)}
    return {"rss_bytes": process.memory_info().rss}


class SystemSampler:
    """Samples the hardware in a daemon thread; `take()` returns the summary of the samples since the last take."""

    def __init__(self, interval_s: float, *, use_gpus: bool):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.handles = _nvml_handles() if use_gpus else []
        self._samples: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._taken = False

    def start(self) -> SystemSampler:
        self.process.cpu_percent(None)  # the first call only sets the baseline
        self._thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.handles:
            _nvml_shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._safe_sample()
            with self._lock:
                self._samples.extend(sample)

    def _safe_sample(self) -> list[dict[str, float]]:
        try:
            return [self.sample()]
        except Exception as exc:  # a driver hiccup must not end the training run
            log.warning("system sample failed: %s", exc)
            return []

    def sample(self) -> dict[str, float]:
        """One reading: per GPU through NVML, else the process's CPU % (100 = one core) and resident set."""
        if not self.handles:
            return {"cpu_percent": self.process.cpu_percent(None), "rss_peak_bytes": self.process.memory_info().rss}
        import pynvml

        values: dict[str, float] = {}
        for index, handle in enumerate(self.handles):
            values[f"gpu{index}_utilization_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            values[f"gpu{index}_memory_used_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            try:
                values[f"gpu{index}_power_watts"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except pynvml.NVMLError:  # some boards (and MIG slices) do not report power
                pass
        return values

    def take(self) -> dict[str, float]:
        """The samples since the last take: memory and RSS at their peak, everything else averaged. The first take
        reads the hardware itself when the thread has not yet sampled, so even a run shorter than one interval
        reports a reading on its first step."""
        with self._lock:
            samples, self._samples = self._samples, []
        if not samples and not self._taken:
            samples = self._safe_sample()
        self._taken = True
        if not samples:
            return {}
        summary = {}
        for name in samples[-1]:
            values = [s[name] for s in samples if name in s]
            peak = name.endswith("_bytes")
            summary[name] = max(values) if peak else round(sum(values) / len(values), 3)
        return summary


def _nvml_handles() -> list[Any]:
    """NVML handles of the CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied), in CUDA order."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, or nvidia-ml-py missing: the CPU sample instead
        log.info("NVML unavailable (%s): sampling CPU and RSS", exc)
        return []
    handles = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        try:
            # NVML numbers all of the machine's GPUs; CUDA only the visible ones: match by UUID.
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        handles.append(handle)
    return handles


def _nvml_shutdown() -> None:
    import pynvml

    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass
