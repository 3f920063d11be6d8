"""The Ray executor: each attempt an actor on an existing Ray cluster, holding the job's GPUs (or a CPU) and
running the recipe as a child process, exactly as the local executor does, so it can be stopped with
SIGTERM and checkpoints the same way. Tuneforge must be installed where the Ray workers run, and
TUNEFORGE_HOME must be shared storage (the paths in spec.json are the same on every node).

The worker that uses this executor places jobs on the cluster's nodes (from ray.nodes()) and pins each
actor to the chosen node, so its accounting matches Ray's. One node per job: multi-node jobs need the
kubernetes executor for now.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from tuneforge.launch.capabilities import host_strategies
from tuneforge.scheduler.executors import LaunchError
from tuneforge.launch.commands import RESTART_VARIABLE, recipe_command, recipe_environment
from tuneforge.scheduler.launch import RECIPE_LOG
from tuneforge.scheduler.placement import CPU, Node
from tuneforge.spec.job import JobSpec

POLL_TIMEOUT_S = 30


class RecipeProcess:
    """Ray actor body: starts the recipe as a child of the actor process and reports on it."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: str):
        self.command, self.env, self.log_path, self.process = command, env, log_path, None

    def start(self) -> int:
        from tuneforge.scheduler.executors.process import spawn

        self.process = spawn(self.command, env={**os.environ, **self.env}, log_path=Path(self.log_path))
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        from tuneforge.scheduler.executors.process import signal_group

        signal_group(self.process, signum)


class RayRun:
    def __init__(self, actor):
        self.actor = actor

    def poll(self) -> int | None:
        import ray

        try:
            return ray.get(self.actor.poll.remote(), timeout=POLL_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            return -1  # the actor (and with it the recipe) is gone: its node died

    def terminate(self) -> None:
        self.actor.signal.remote(int(signal.SIGTERM))

    def kill(self) -> None:
        self.actor.signal.remote(int(signal.SIGKILL))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class RayExecutor:
    kind = "ray"

    def __init__(self, *, address: str | None = None, gpu_type: str | None = None, cpus_per_job: int = 1):
        try:
            import ray
        except ImportError:
            raise LaunchError("the ray executor needs Ray: pip install 'tuneforge[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=address or "auto", ignore_reinit_error=True, logging_level="WARNING", log_to_driver=False)
        self.gpu_type, self.cpus_per_job = gpu_type or "any", cpus_per_job
        self.node_ids: list[str] = []

    def strategies(self) -> list[str]:
        return host_strategies()  # Ray runs the recipes in the environment the worker shares with its cluster

    def inventory(self) -> list[Node]:
        import ray

        nodes = []
        self.node_ids = []
        for node in sorted(ray.nodes(), key=lambda n: n["NodeID"]):
            if not node.get("Alive"):
                continue
            resources = node.get("Resources", {})
            gpus = int(resources.get("GPU", 0))
            if gpus:
                nodes.append(Node(self.gpu_type, gpus))
            else:
                nodes.append(Node(CPU, max(1, int(resources.get("CPU", 1)) // self.cpus_per_job)))
            self.node_ids.append(node["NodeID"])
        return nodes

    def launch(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, placement: dict[str, Any],
               restart: int = 0) -> RayRun:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if spec.resources.num_nodes > 1:
            raise LaunchError("the ray executor runs single-node jobs; use the kubernetes executor for num_nodes > 1")
        (node_index, gpus), = placement["nodes"]
        on_gpu = self.inventory()[node_index].gpu_type != CPU
        actor_class = ray.remote(RecipeProcess).options(
            num_gpus=gpus if on_gpu else 0, num_cpus=self.cpus_per_job,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_ids[node_index], soft=False),
        )
        env = recipe_environment({"PYTHONUNBUFFERED": "1", "TUNEFORGE_JOB_ID": job_id, "TUNEFORGE_ATTEMPT": str(attempt),
                                  RESTART_VARIABLE: str(restart)})
        if not on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if "TUNEFORGE_HOME" in os.environ:
            env["TUNEFORGE_HOME"] = os.environ["TUNEFORGE_HOME"]
        command = recipe_command(spec, job_dir, python=sys.executable, job_id=job_dir.name)
        actor = actor_class.remote(command, env, str(job_dir / RECIPE_LOG))
        try:
            ray.get(actor.start.remote(), timeout=120)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's launch error
            ray.kill(actor)
            raise LaunchError(f"ray could not start the recipe: {exc}") from None
        return RayRun(actor)
