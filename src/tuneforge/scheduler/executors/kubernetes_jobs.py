"""The Kubernetes executor: each attempt a batch/v1 Job (one node) or a Kubeflow PyTorchJob (several nodes)
running the recipe under torchrun in the project's image, with TUNEFORGE_HOME on a shared volume.

Manifests are rendered here as plain dicts (tested against the Kubernetes API models without a cluster);
they are submitted with the `kubernetes` client only when a cluster is configured (the `kubernetes` extra,
in-cluster config or ~/.kube/config). The volume is mounted at the worker's own TUNEFORGE_HOME path, so
the paths in a job's spec.json mean the same thing in the pod. A run's exit code is its recipe's own,
read from the pod, or, once the pods are gone, from the Job's own Failed condition: its podFailurePolicy
fails it on the recipe's first non-zero exit with the code in the condition's message, so bad input (2) is
never retried and a stop after a checkpoint (75) is re-queued, not counted as a crash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuneforge.launch.capabilities import host_strategies, parse_strategies
from tuneforge.home import tuneforge_home
from tuneforge.scheduler.executors import LaunchError
from tuneforge.launch.commands import RESTART_VARIABLE, recipe_args
from tuneforge.spec.jobdir import EXIT_PREEMPTED
from tuneforge.scheduler.placement import Node
from tuneforge.settings import Settings
from tuneforge.spec.job import JobSpec

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TYPE_LABEL = "tuneforge.dev/gpu-type"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
# The Job controller's message for a pod failure a podFailurePolicy rule matched (batch/v1, Kubernetes >= 1.26).
POLICY_EXIT_CODE = re.compile(r"failed with exit code (\d+) matching FailJob rule")
RUN_LABEL = "tuneforge.dev/run"  # on every pod of one run: where its exit code is read
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"


def manifest_name(job_id: str, attempt: int, restart: int = 0) -> str:
    """A DNS-1123 name, unique per run (a Job's pod template cannot be changed, so each attempt, and each
    crash restart within it, is a new one)."""
    suffix = f"-a{attempt}" + (f"-r{restart}" if restart else "")
    return re.sub(r"[^a-z0-9-]", "-", f"tuneforge-{job_id.removeprefix('ftjob-')[:24]}{suffix}".lower())[:63]


def render_manifest(*, job_id: str, attempt: int, spec: JobSpec, settings: Settings, home: Path | None = None,
                    restart: int = 0) -> dict[str, Any]:
    home = home or tuneforge_home()
    job_dir = home / "jobs" / job_id
    gpus, nodes = spec.resources.num_gpus, spec.resources.num_nodes
    gpu_job = spec.resources.gpu_type != "cpu"
    name = manifest_name(job_id, attempt, restart)
    labels = {"app.kubernetes.io/name": "tuneforge", "app.kubernetes.io/component": "recipe",
              "tuneforge.dev/job-id": job_id, "tuneforge.dev/attempt": str(attempt), RUN_LABEL: name}
    multi = nodes > 1
    launcher = ["torchrun", f"--nproc-per-node={gpus}"] if (gpus > 1 or multi) else ["python"]
    container: dict[str, Any] = {
        "name": "pytorch" if multi else "recipe",  # the training operator requires "pytorch"
        "image": settings.k8s_image,
        "command": launcher,
        "args": recipe_args(spec, job_dir),
        "env": [
            {"name": "TUNEFORGE_HOME", "value": str(home)},
            {"name": "TUNEFORGE_JOB_ID", "value": job_id},
            {"name": "TUNEFORGE_ATTEMPT", "value": str(attempt)},
            {"name": RESTART_VARIABLE, "value": str(restart)},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {"limits": {GPU_RESOURCE: str(gpus)}} if gpu_job else {"requests": {"cpu": str(gpus)}},
        "volumeMounts": [{"name": "tuneforge-home", "mountPath": str(home)}],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM first: the recipe finishes its step and writes a checkpoint before the pod goes.
        "terminationGracePeriodSeconds": int(settings.stop_grace_seconds),
        "containers": [container],
        "volumes": [{"name": "tuneforge-home", "persistentVolumeClaim": {"claimName": settings.k8s_pvc}}],
    }
    if gpu_job and spec.resources.gpu_type != "any":
        pod_spec["nodeSelector"] = {GPU_TYPE_LABEL: spec.resources.gpu_type}
    if settings.k8s_service_account:
        pod_spec["serviceAccountName"] = settings.k8s_service_account
    template = {"metadata": {"labels": labels}, "spec": pod_spec}
    metadata = {"name": name, "namespace": settings.k8s_namespace, "labels": labels}
    if not multi:
        # backoffLimit 0: tuneforge restarts and re-queues, not the Job controller. The rule writes the recipe's
        # exit code into the Job's Failed condition, where it outlives the pod.
        failure_policy = {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": container["name"], "operator": "NotIn", "values": [0]}}]}
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
                "spec": {"backoffLimit": 0, "podFailurePolicy": failure_policy, "ttlSecondsAfterFinished": 86400,
                         "template": template}}
    replica = {"restartPolicy": "Never", "template": template}
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}", "kind": "PyTorchJob", "metadata": metadata,
        "spec": {
            "nprocPerNode": str(gpus),
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None", "ttlSecondsAfterFinished": 86400},
            "pytorchReplicaSpecs": {"Master": {"replicas": 1, **replica}, "Worker": {"replicas": nodes - 1, **replica}},
        },
    }


def container_exit_code(code: int) -> int:
    """A container killed by signal N exits 128 + N; report it as -N, as a local process would be."""
    return -(code - 128) if 128 < code <= 128 + 64 else code


def condition_exit_code(conditions) -> int | None:
    """The recipe's exit code from a Job's Failed condition written by its podFailurePolicy, if there is one."""
    for condition in conditions or []:
        if condition.type == "Failed" and condition.status == "True":
            if match := POLICY_EXIT_CODE.search(condition.message or ""):
                return container_exit_code(int(match.group(1)))
    return None


def parse_inventory(text: str) -> list[Node]:
    """'h100-80gb:8,h100-80gb:8' -> two nodes of 8 H100s."""
    nodes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        gpu_type, _, count = item.rpartition(":")
        if not gpu_type or not count.isdigit():
            raise ValueError(f"TUNEFORGE_K8S_INVENTORY item {item!r}: expected GPU_TYPE:COUNT, e.g. h100-80gb:8")
        nodes.append(Node(gpu_type, int(count)))
    return nodes


class KubernetesRun:
    def __init__(self, manifest: dict[str, Any]):
        from kubernetes import client

        self.manifest, self.name = manifest, manifest["metadata"]["name"]
        self.namespace = manifest["metadata"]["namespace"]
        self.batch, self.custom, self.core = client.BatchV1Api(), client.CustomObjectsApi(), client.CoreV1Api()
        self.pytorchjob = manifest["kind"] == "PyTorchJob"
        self.stopped = False

    def poll(self) -> int | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if self.pytorchjob:
                status = self.custom.get_namespaced_custom_object_status(
                    PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, self.namespace, PYTORCHJOB_PLURAL, self.name).get("status", {})
                kinds = {c["type"] for c in status.get("conditions", []) if c.get("status") == "True"}
                return 0 if "Succeeded" in kinds else self.exit_code() if "Failed" in kinds else None
            status = self.batch.read_namespaced_job_status(self.name, self.namespace).status
            if status.succeeded:
                return 0
            if status.failed:
                # The Job's condition first: it outlives the pods (exit_code() answers 1 when none is left).
                return condition_exit_code(status.conditions) or self.exit_code()
            return None
        except ApiException as exc:
            if exc.status == 404 and self.stopped:
                return EXIT_PREEMPTED  # deleted on our request, after its grace period
            raise

    def exit_code(self) -> int:
        """The recipe's exit code from the run's failed pod (a PyTorchJob's master first); 1 when no pod
        says (they were deleted, or the worker's service account may not list pods)."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{RUN_LABEL}={self.name}").items
        except ApiException:
            return 1
        pods = sorted(pods, key=lambda pod: ((pod.metadata.labels or {}).get(REPLICA_TYPE_LABEL) or "").lower() != "master")
        for pod in pods:
            for container in (pod.status.container_statuses or []) if pod.status else []:
                ended = (container.state and container.state.terminated) or (
                    container.last_state and container.last_state.terminated)
                if ended is not None and ended.exit_code:
                    return container_exit_code(ended.exit_code)
        return 1

    def _delete(self, grace: int | None) -> None:
        from kubernetes import client

        options = client.V1DeleteOptions(propagation_policy="Background", grace_period_seconds=grace)
        self.stopped = True
        if self.pytorchjob:
            self.custom.delete_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, self.namespace,
                                                        PYTORCHJOB_PLURAL, self.name, body=options)
        else:
            self.batch.delete_namespaced_job(self.name, self.namespace, body=options)

    def terminate(self) -> None:
        self._delete(None)

    def kill(self) -> None:
        self._delete(0)

    def close(self) -> None:
        pass


class KubernetesExecutor:
    kind = "kubernetes"

    def __init__(self, *, settings: Settings):
        self.settings = settings
        self.nodes = parse_inventory(settings.k8s_inventory)
        if not self.nodes:
            raise ValueError("the kubernetes executor needs TUNEFORGE_K8S_INVENTORY (e.g. h100-80gb:8,h100-80gb:8)")
        try:
            from kubernetes import config
        except ImportError:
            raise LaunchError("the kubernetes executor needs the kubernetes client: pip install 'tuneforge[kubernetes]'") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()

    def inventory(self) -> list[Node]:
        return list(self.nodes)

    def strategies(self) -> list[str]:
        if self.settings.k8s_strategies:  # the recipe image is not necessarily the worker's environment
            return parse_strategies(self.settings.k8s_strategies, variable="TUNEFORGE_K8S_STRATEGIES")
        return host_strategies()

    def launch(self, *, job_id: str, attempt: int, job_dir: Path, spec: JobSpec, placement: dict[str, Any],
               restart: int = 0) -> KubernetesRun:
        manifest = render_manifest(job_id=job_id, attempt=attempt, spec=spec, settings=self.settings, restart=restart)
        run = KubernetesRun(manifest)
        if run.pytorchjob:
            run.custom.create_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, run.namespace,
                                                       PYTORCHJOB_PLURAL, manifest)
        else:
            run.batch.create_namespaced_job(run.namespace, manifest)
        return run
