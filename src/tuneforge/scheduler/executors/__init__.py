"""Executors run a job's recipe somewhere: `local` (subprocesses here), `ray` (an actor per job on a Ray
cluster), `kubernetes` (a Job or a Kubeflow PyTorchJob). The worker loop talks to them through `Executor`
and `Run`; which one is a closed choice of configuration (TUNEFORGE_EXECUTOR), never a class path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tuneforge.scheduler.placement import Node
from tuneforge.spec.job import JobSpec


class Run(Protocol):
    """One attempt of one job, running."""

    def poll(self) -> int | None:
        """The exit code once it has finished, else None."""

    def terminate(self) -> None:
        """Ask it to stop: SIGTERM, on which the recipe writes a checkpoint and exits 75."""

    def kill(self) -> None:
        """Stop it now."""

    def close(self) -> None:
        """Release what the executor held for it (devices, locks, cluster objects)."""


class Executor(Protocol):
    kind: str

    def inventory(self) -> list[Node]:
        """The nodes this executor can place jobs on."""

    def strategies(self) -> list[str]:
        """The distributed strategies its recipes can run (launch/capabilities.py), reported with the inventory."""

    def launch(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, placement: dict[str, Any],
               restart: int = 0) -> Run | None:
        """Start the recipe; None when it cannot start yet (the previous run still holds the directory).

        restart: the job's crash restarts before this run (TUNEFORGE_RESTART in the recipe's environment);
        a crashed run is started again in the same attempt."""


def job_root_shared(kind: str, settings: Any) -> bool:
    """Whether every node of this executor sees the worker's job directories: the kubernetes executor mounts
    its PVC (ReadWriteMany for a job on several nodes) in every pod; the others where the operator says so
    (TUNEFORGE_SHARED_JOB_ROOT). The object store does not stand in for it: it carries a job's inputs and
    outputs, not the checkpoint shards every rank writes while it trains."""
    return kind == "kubernetes" or bool(settings.shared_job_root)


class LaunchError(RuntimeError):
    """The executor could not start the job at all (the job fails with this message)."""


def build_executor(kind: str, **options: Any) -> Executor:
    if kind == "local":
        from tuneforge.scheduler.executors.local import LocalExecutor

        return LocalExecutor(**options)
    if kind == "ray":
        from tuneforge.scheduler.executors.ray_cluster import RayExecutor

        return RayExecutor(**options)
    if kind == "kubernetes":
        from tuneforge.scheduler.executors.kubernetes_jobs import KubernetesExecutor

        return KubernetesExecutor(**options)
    raise ValueError(f"unknown executor {kind!r}: expected local, ray or kubernetes")
