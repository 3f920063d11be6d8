"""The local executor: each job a subprocess on this machine, GPUs handed out through CUDA_VISIBLE_DEVICES,
torchrun when a job asks for several; on a machine without a GPU, CPU slots so everything still runs.

A job directory is locked (flock) by the recipe process for as long as it lives: the lock file
descriptor is inherited by the child, so even if this worker dies, a new attempt cannot start in that
directory until the previous recipe has exited.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from tuneforge.launch.capabilities import host_strategies
from tuneforge.scheduler.executors import LaunchError
from tuneforge.scheduler.executors.process import signal_group, spawn
from tuneforge.launch.commands import RESTART_VARIABLE, recipe_command, recipe_environment
from tuneforge.scheduler.launch import RECIPE_LOG
from tuneforge.scheduler.placement import CPU, Node
from tuneforge.spec.job import JobSpec

LOCK_FILE = ".lock"

# nvidia-smi product names -> the GPU types a JobSpec can ask for.
_GPU_NAMES = (
    ("H200", "h200"), ("H100", "h100-80gb"), ("B200", "b200"), ("A100-SXM4-80GB", "a100-80gb"),
    ("A100 80GB", "a100-80gb"), ("A100-PCIE-80GB", "a100-80gb"), ("A100", "a100-40gb"), ("A10G", "a10g"),
    ("L4", "l4"), ("T4", "t4"),
)


def gpu_type_of(product_name: str) -> str:
    for marker, gpu_type in _GPU_NAMES:
        if marker in product_name:
            return gpu_type
    return product_name.strip().lower().replace(" ", "-")[:24] or "unknown"


def detect_gpus() -> list[str]:
    """Product names of this machine's NVIDIA GPUs, without importing torch (empty when there are none)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class LocalRun:
    def __init__(self, process: subprocess.Popen, devices: list[int], release):
        self.process, self.devices, self._release = process, devices, release

    def poll(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        signal_group(self.process, signal.SIGTERM)

    def kill(self) -> None:
        signal_group(self.process, signal.SIGKILL)

    def close(self) -> None:
        self._release(self.devices)


class LocalExecutor:
    kind = "local"

    def __init__(self, *, gpus: int | None = None, gpu_type: str | None = None, cpu_slots: int | None = None):
        if gpus is None:
            names = detect_gpus()
            gpus, detected_type = len(names), (gpu_type_of(names[0]) if names else None)
            gpu_type = gpu_type or detected_type
        self.gpus = gpus
        if gpus > 0:
            self.gpu_type = gpu_type or "any"
            self.slots = gpus
        else:
            # No GPU: CPU slots. One by default on small machines: two trainings on two cores only
            # slow each other down.
            self.gpu_type = CPU
            self.slots = cpu_slots or max(1, (os.cpu_count() or 1) // 4)
        self._busy: set[int] = set()

    def inventory(self) -> list[Node]:
        return [Node(self.gpu_type, self.slots)]

    def strategies(self) -> list[str]:
        return host_strategies()  # the recipes run in this worker's own environment

    def launch(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, placement: dict[str, Any],
               restart: int = 0) -> LocalRun | None:
        if spec.resources.num_nodes > 1:
            raise LaunchError("the local executor runs single-node jobs; use the ray or kubernetes executor for num_nodes > 1")
        lock_fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None  # the previous attempt's recipe is still exiting
        try:
            devices = self._take(spec.resources.num_gpus)
            env = {**os.environ, **recipe_environment({"PYTHONUNBUFFERED": "1", "TUNEFORGE_JOB_ID": job_id,
                                                        "TUNEFORGE_ATTEMPT": str(attempt), RESTART_VARIABLE: str(restart)})}
            if self.gpus > 0:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            else:
                env["CUDA_VISIBLE_DEVICES"] = ""
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.slots)))
            command = recipe_command(spec, job_dir, job_id=job_dir.name)
            try:
                process = spawn(command, env=env, log_path=job_dir / RECIPE_LOG, pass_fds=(lock_fd,))
            except OSError as exc:
                self._release(devices)
                raise LaunchError(f"could not start the recipe: {exc}") from None
        finally:
            os.close(lock_fd)  # the child keeps its inherited copy, and with it the lock
        return LocalRun(process, devices, self._release)

    def _take(self, count: int) -> list[int]:
        free = [i for i in range(self.slots) if i not in self._busy]
        if len(free) < count:
            raise LaunchError(f"asked for {count} devices, {len(free)} free (placement and executor disagree)")
        taken = free[:count]
        self._busy.update(taken)
        return taken

    def _release(self, devices: list[int]) -> None:
        self._busy.difference_update(devices)
