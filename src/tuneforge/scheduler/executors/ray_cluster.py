"""The Ray executor: each attempt an actor on an existing Ray cluster, holding the job's GPUs (or a CPU) and
running the recipe as a child process, exactly as the local executor does, so it can be stopped with
SIGTERM and checkpoints the same way. Tuneforge must be installed where the Ray workers run, and
TUNEFORGE_HOME must be shared storage (the paths in spec.json are the same on every node).

The worker that uses this executor places jobs on the cluster's nodes (from ray.nodes()) and pins a
single-node job's actor to the chosen node, so its accounting matches Ray's. A job on several nodes is a
gang: a placement group with one bundle per node (STRICT_SPREAD, so Ray puts each on its own node), an
actor in each bundle, each running torchrun with a c10d rendezvous at node 0's address. Ray decides which
nodes hold the gang; the run starts once the group is placed (a node that died is waited for until
another one joins) and ends, all of it, when any node's recipe ends badly or a node is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tuneforge.launch.capabilities import host_strategies
from tuneforge.scheduler.executors import LaunchError
from tuneforge.launch.commands import RESTART_VARIABLE, recipe_command, recipe_environment
from tuneforge.scheduler.launch import RECIPE_LOG
from tuneforge.scheduler.placement import CPU, Node
from tuneforge.spec.job import JobSpec
from tuneforge.spec.jobdir import EXIT_PREEMPTED

POLL_TIMEOUT_S = 30
NODE_LOST = -int(signal.SIGKILL)  # a run whose node died: its processes went with it
PLACEMENT_WAIT_S = 1.0  # how long one launch call waits for a gang's placement group (the worker calls again)
PENDING_FORGOTTEN_S = 120.0  # a waiting placement group no launch asked about for this long is removed
STRAGGLER_GRACE_S = 60.0  # a gang node still running this long after another ended badly is stopped


class RecipeProcess:
    """Ray actor body: starts the recipe as a child of the actor process and reports on it."""

    def __init__(self, command: list[str] | None, env: dict[str, str], log_path: str):
        self.command, self.env, self.log_path, self.process = command, env, log_path, None

    def start(self, command: list[str] | None = None) -> int:
        """Start the recipe (a gang's nodes get their command here: it holds node 0's rendezvous address,
        known only once node 0's actor is up)."""
        from tuneforge.scheduler.executors.process import spawn

        self.command = command or self.command
        self.process = spawn(self.command, env={**os.environ, **self.env}, log_path=Path(self.log_path))
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        from tuneforge.scheduler.executors.process import signal_group

        if self.process is not None:
            signal_group(self.process, signum)

    def rendezvous_address(self) -> str:
        """HOST:PORT for torchrun's c10d store on this node: a port free here now (the gang's node 0)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"


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


class RayGangRun:
    """A job on several nodes: one RecipeProcess actor per bundle of its placement group."""

    def __init__(self, actors: list, group):
        self.actors, self.group = actors, group
        self.codes: list[int | None] = [None] * len(actors)
        self.first_bad_at: float | None = None

    def poll(self) -> int | None:
        import ray

        refs = [(i, actor.poll.remote()) for i, actor in enumerate(self.actors) if self.codes[i] is None]
        for i, ref in refs:
            try:
                self.codes[i] = ray.get(ref, timeout=POLL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                self.codes[i] = NODE_LOST  # the actor (and with it that node's recipe) is gone: its node died
        bad = [code for code in self.codes if code not in (None, 0, EXIT_PREEMPTED)]
        if bad and self.first_bad_at is None:
            self.first_bad_at = time.monotonic()
        running = [i for i, code in enumerate(self.codes) if code is None]
        if running and bad and (NODE_LOST in bad or time.monotonic() - self.first_bad_at > STRAGGLER_GRACE_S):
            # A rank's collectives cannot complete without the lost node; the last checkpoint is what resumes.
            self.kill()
            for i in running:
                self.codes[i] = NODE_LOST
            running = []
        if running:
            return None
        return gang_exit_code(self.codes)

    def terminate(self) -> None:
        for actor in self.actors:
            actor.signal.remote(int(signal.SIGTERM))

    def kill(self) -> None:
        for actor in self.actors:
            actor.signal.remote(int(signal.SIGKILL))

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        # No recipe of this run may outlive it: the next run starts in the same job directory.
        stops = [actor.signal.remote(int(signal.SIGKILL)) for actor in self.actors]
        for ref in stops:
            try:
                ray.get(ref, timeout=POLL_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


def gang_exit_code(codes: list[int]) -> int:
    """One exit code for the nodes' torchrun codes: the first failure, else 75 if any node stopped on
    request, else 0 (launch/outcome.py then reads the recipe's own events for the rest)."""
    failures = [code for code in codes if code not in (0, EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


class RayExecutor:
    kind = "ray"

    def __init__(self, *, address: str | None = None, gpu_type: str | None = None, cpus_per_job: int = 1,
                 placement_timeout_s: float = 600.0):
        try:
            import ray
        except ImportError:
            raise LaunchError("the ray executor needs Ray: pip install 'tuneforge[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=address or "auto", ignore_reinit_error=True, logging_level="WARNING", log_to_driver=False)
        self.gpu_type, self.cpus_per_job = gpu_type or "any", cpus_per_job
        self.node_ids: list[str] = []
        self.node_types: list[str] = []  # the GPU type (or cpu) of each node in the last inventory
        self.placement_timeout_s = placement_timeout_s
        # run name -> (its placement group, when first asked for, when last asked for)
        self.pending: dict[str, tuple[Any, float, float]] = {}

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
        self.node_types = [node.gpu_type for node in nodes]
        return nodes

    def launch(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, placement: dict[str, Any],
               restart: int = 0) -> RayRun:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if spec.resources.num_nodes > 1:
            return self._launch_gang(job_id=job_id, attempt=attempt, job_dir=job_dir, spec=spec, restart=restart,
                                     on_gpu=self._gpu_placement(placement, spec))
        (node_index, gpus), = placement["nodes"]
        on_gpu = self.inventory()[node_index].gpu_type != CPU
        actor_class = ray.remote(RecipeProcess).options(
            num_gpus=gpus if on_gpu else 0, num_cpus=self.cpus_per_job,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_ids[node_index], soft=False),
        )
        env = self._environment(job_id=job_id, attempt=attempt, restart=restart, on_gpu=on_gpu)
        command = recipe_command(spec, job_dir, python=sys.executable, job_id=job_dir.name)
        actor = actor_class.remote(command, env, str(job_dir / RECIPE_LOG))
        try:
            ray.get(actor.start.remote(), timeout=120)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's launch error
            ray.kill(actor)
            raise LaunchError(f"ray could not start the recipe: {exc}") from None
        return RayRun(actor)

    def _gpu_placement(self, placement: dict[str, Any], spec: JobSpec) -> bool:
        """Whether the worker placed this job on GPU nodes (or on CPU slots)."""
        index = placement["nodes"][0][0]
        return (self.node_types[index] if index < len(self.node_types) else spec.resources.gpu_type) != CPU

    def _environment(self, *, job_id: str, attempt: int, restart: int, on_gpu: bool) -> dict[str, str]:
        env = recipe_environment({"PYTHONUNBUFFERED": "1", "TUNEFORGE_JOB_ID": job_id, "TUNEFORGE_ATTEMPT": str(attempt),
                                  RESTART_VARIABLE: str(restart)})
        if not on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if "TUNEFORGE_HOME" in os.environ:
            env["TUNEFORGE_HOME"] = os.environ["TUNEFORGE_HOME"]
        return env

    def _placement_group(self, name: str, spec: JobSpec, *, on_gpu: bool):
        """The gang's placement group once Ray has placed it; None while it waits for nodes (asked for at the
        first call, looked at again at each later one). LaunchError when it has waited placement_timeout_s."""
        from ray.util.placement_group import placement_group, remove_placement_group

        now = time.monotonic()
        for other, (group, _, seen) in list(self.pending.items()):
            if other != name and now - seen > PENDING_FORGOTTEN_S:  # its job was stopped while it waited
                del self.pending[other]
                remove_placement_group(group)
        if name not in self.pending:
            bundle = {"CPU": float(self.cpus_per_job), **({"GPU": float(spec.resources.num_gpus)} if on_gpu else {})}
            self.pending[name] = (placement_group([bundle] * spec.resources.num_nodes, strategy="STRICT_SPREAD",
                                                  name=name), now, now)
        group, asked, _ = self.pending[name]
        self.pending[name] = (group, asked, now)
        if group.wait(timeout_seconds=PLACEMENT_WAIT_S):
            del self.pending[name]
            return group
        if time.monotonic() - asked > self.placement_timeout_s:
            del self.pending[name]
            remove_placement_group(group)
            raise LaunchError(f"the Ray cluster has not had {spec.resources.num_nodes} separate nodes with "
                              f"{spec.resources.num_gpus} {'GPU(s)' if on_gpu else 'CPU slot(s)'} free for "
                              f"{self.placement_timeout_s:.0f}s")
        return None

    def _launch_gang(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, restart: int,
                     on_gpu: bool) -> RayGangRun | None:
        import ray
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        name = f"tuneforge-{job_id}-a{attempt}-r{restart}"
        group = self._placement_group(name, spec, on_gpu=on_gpu)
        if group is None:
            return None  # the worker asks again at its next tick
        actors = [ray.remote(RecipeProcess).options(
            num_cpus=self.cpus_per_job, num_gpus=spec.resources.num_gpus if on_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=node),
        ).remote(None, self._environment(job_id=job_id, attempt=attempt, restart=restart, on_gpu=on_gpu),
                 str(job_dir / RECIPE_LOG)) for node in range(spec.resources.num_nodes)]
        try:
            endpoint = ray.get(actors[0].rendezvous_address.remote(), timeout=120)
            rdzv_id = f"{job_dir.name}-a{attempt}-r{restart}"  # a fresh rendezvous for each run
            ray.get([actor.start.remote(recipe_command(spec, job_dir, python=sys.executable, node_rank=node,
                                                       rdzv_endpoint=endpoint, job_id=rdzv_id, rdzv_host=node == 0))
                     for node, actor in enumerate(actors)], timeout=120)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's launch error
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(group)
            raise LaunchError(f"ray could not start the recipe on {len(actors)} nodes: {exc}") from None
        return RayGangRun(actors, group)
