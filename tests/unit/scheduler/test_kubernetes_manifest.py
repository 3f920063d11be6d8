"""Kubernetes manifests, rendered without a cluster: a batch/v1 Job for one node and a Kubeflow PyTorchJob for
several, validated against the Kubernetes OpenAPI schema (the JSON schema of the official client's models,
generated from the OpenAPI document of its release, closed so that a field the API lacks is an error), against
a schema of the values tuneforge sets (names, labels, quantities, which the OpenAPI document leaves to the
server), and round-tripped through the client's API models."""

from __future__ import annotations

import pytest

from tuneforge.scheduler.executors.kubernetes_jobs import manifest_name, parse_inventory, render_manifest
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec

jsonschema = pytest.importorskip("jsonschema")
kubernetes = pytest.importorskip("kubernetes")

DNS_1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|k|M|G)?$"
LABELS = {"type": "object", "propertyNames": {"pattern": r"^([a-z0-9.-]+/)?[A-Za-z0-9._-]{1,63}$"},
          "additionalProperties": {"type": "string", "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"}}
CONTAINER = {
    "type": "object", "required": ["name", "image", "command", "args"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_1123, "maxLength": 63}, "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}}, "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name", "value"], "additionalProperties": False,
                                            "properties": {"name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                                           "value": {"type": "string"}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "limits": {"type": "object", "additionalProperties": {"type": "string", "pattern": QUANTITY}},
            "requests": {"type": "object", "additionalProperties": {"type": "string", "pattern": QUANTITY}}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
POD_TEMPLATE = {
    "type": "object", "required": ["spec"], "properties": {
        "metadata": {"type": "object", "properties": {"labels": LABELS}},
        "spec": {"type": "object", "required": ["containers", "restartPolicy"], "properties": {
            "restartPolicy": {"enum": ["Never", "OnFailure"]},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
            "nodeSelector": LABELS,
            "volumes": {"type": "array", "items": {"type": "object", "required": ["name", "persistentVolumeClaim"]}},
        }},
    },
}
METADATA = {"type": "object", "required": ["name", "namespace"], "properties": {
    "name": {"type": "string", "pattern": DNS_1123, "maxLength": 63},
    "namespace": {"type": "string", "pattern": DNS_1123}, "labels": LABELS}}
JOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "batch/v1"}, "kind": {"const": "Job"}, "metadata": METADATA,
        "spec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
            "backoffLimit": {"type": "integer", "minimum": 0}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "template": POD_TEMPLATE}},
    },
}
REPLICA = {"type": "object", "required": ["replicas", "template"], "additionalProperties": False, "properties": {
    "replicas": {"type": "integer", "minimum": 1}, "restartPolicy": {"enum": ["Never", "OnFailure", "Always", "ExitCode"]},
    "template": POD_TEMPLATE}}
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"}, "metadata": METADATA,
        "spec": {"type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False, "properties": {
            "nprocPerNode": {"type": "string", "pattern": r"^([0-9]+|auto|cpu|gpu)$"},
            "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                "backoffLimit": {"type": "integer", "minimum": 0}, "ttlSecondsAfterFinished": {"type": "integer"},
                "cleanPodPolicy": {"enum": ["None", "Running", "All"]}}},
            "pytorchReplicaSpecs": {"type": "object", "required": ["Master"], "additionalProperties": False,
                                    "properties": {"Master": REPLICA, "Worker": REPLICA}}}},
    },
}


def openapi_schema(model) -> dict:
    """The Kubernetes OpenAPI schema of one API object, as the client's pydantic models carry it, with every
    object closed (the API server rejects unknown fields under kubectl's default strict field validation)."""
    schema = model.model_json_schema(by_alias=True)
    for node in [schema, *schema.get("$defs", {}).values()]:
        if "properties" in node:
            node["additionalProperties"] = False
    return schema


# Validators built once: jsonschema.validate() would check the large schema itself on every call.
OPENAPI_JOB = jsonschema.Draft202012Validator(openapi_schema(kubernetes.client.V1Job))
OPENAPI_POD_TEMPLATE = jsonschema.Draft202012Validator(openapi_schema(kubernetes.client.V1PodTemplateSpec))
JOB_SCHEMA["properties"]["spec"]["properties"]["podFailurePolicy"] = {"type": "object"}  # its shape: OPENAPI_JOB's
SETTINGS = Settings.from_env(k8s_namespace="ml-train", k8s_image="registry.local/tuneforge:0.1", k8s_pvc="tf-home",
                             k8s_service_account="tuneforge")


def spec(**resources):
    return validate_job_spec({"dataset": {"path": "/data/train.jsonl"}, "resources": resources})


def round_trip(data: dict, model: str) -> dict:
    api = kubernetes.client.ApiClient()
    return api.sanitize_for_serialization(api._ApiClient__deserialize(data, model))


def test_single_node_gpu_job_renders_a_valid_batch_job(tmp_path):
    manifest = render_manifest(job_id="ftjob-ABC123", attempt=2, spec=spec(num_gpus=4, gpu_type="h100-80gb"),
                               settings=SETTINGS, home=tmp_path)
    jsonschema.validate(manifest, JOB_SCHEMA)
    OPENAPI_JOB.validate(manifest)
    assert round_trip(manifest, "V1Job") == manifest
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun", "--nproc-per-node=4"]
    assert container["args"][:2] == ["-m", "tuneforge.recipes.sft"] and str(tmp_path / "jobs" / "ftjob-ABC123") in container["args"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert manifest["spec"]["template"]["spec"]["nodeSelector"] == {"tuneforge.dev/gpu-type": "h100-80gb"}
    assert manifest["metadata"]["name"] == "tuneforge-abc123-a2" and manifest["spec"]["backoffLimit"] == 0


def test_cpu_job_asks_for_cpus_and_runs_python_directly(tmp_path):
    manifest = render_manifest(job_id="ftjob-1", attempt=1, spec=spec(gpu_type="cpu"), settings=SETTINGS, home=tmp_path)
    jsonschema.validate(manifest, JOB_SCHEMA)
    OPENAPI_JOB.validate(manifest)
    assert round_trip(manifest, "V1Job") == manifest
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python"] and container["resources"] == {"requests": {"cpu": "1"}}


def test_multi_node_job_renders_a_valid_pytorchjob(tmp_path):
    manifest = render_manifest(job_id="ftjob-big", attempt=1, spec=spec(num_gpus=8, num_nodes=3, gpu_type="a100-80gb"),
                               settings=SETTINGS, home=tmp_path)
    jsonschema.validate(manifest, PYTORCHJOB_SCHEMA)
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        OPENAPI_POD_TEMPLATE.validate(replica["template"])
        assert round_trip(replica["template"], "V1PodTemplateSpec") == replica["template"]
        assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"
    assert manifest["spec"]["nprocPerNode"] == "8"


def test_a_misspelled_field_would_be_caught():
    broken = render_manifest(job_id="ftjob-1", attempt=1, spec=spec(), settings=SETTINGS)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, JOB_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the manifest as rendered passes it (above): the field did this
        OPENAPI_JOB.validate(broken)
    wrong_type = render_manifest(job_id="ftjob-1", attempt=1, spec=spec(), settings=SETTINGS)
    wrong_type["spec"]["backoffLimit"] = "0"
    with pytest.raises(jsonschema.ValidationError):
        OPENAPI_JOB.validate(wrong_type)
    assert round_trip(broken, "V1Job") != broken


def test_names_and_inventory():
    assert manifest_name("ftjob-" + "F" * 40, 12).endswith("-a12") and len(manifest_name("ftjob-" + "f" * 60, 1)) <= 63
    assert [(n.gpu_type, n.gpus) for n in parse_inventory("h100-80gb:8, a10g:1")] == [("h100-80gb", 8), ("a10g", 1)]
    with pytest.raises(ValueError, match="GPU_TYPE:COUNT"):
        parse_inventory("eight")


def test_each_crash_restart_is_a_run_of_its_own(tmp_path):
    manifest = render_manifest(job_id="ftjob-ABC123", attempt=2, spec=spec(gpu_type="cpu"), settings=SETTINGS,
                               home=tmp_path, restart=3)
    jsonschema.validate(manifest, JOB_SCHEMA)
    OPENAPI_JOB.validate(manifest)
    assert manifest["metadata"]["name"] == "tuneforge-abc123-a2-r3" == manifest_name("ftjob-ABC123", 2, 3)
    assert manifest["spec"]["template"]["metadata"]["labels"]["tuneforge.dev/run"] == "tuneforge-abc123-a2-r3"
    env = {e["name"]: e["value"] for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TUNEFORGE_RESTART"] == "3" and env["TUNEFORGE_ATTEMPT"] == "2"


class _Pods:
    """CoreV1Api.list_namespaced_pod answering with pods whose containers ended with these codes."""

    def __init__(self, *pods):
        self.pods, self.selectors = pods, []

    def list_namespaced_pod(self, namespace, label_selector):
        from kubernetes.client import (V1ContainerState, V1ContainerStateTerminated, V1ContainerStatus, V1ObjectMeta,
                                       V1Pod, V1PodList, V1PodStatus)

        self.selectors.append(label_selector)
        items = [V1Pod(metadata=V1ObjectMeta(labels={"training.kubeflow.org/replica-type": role}),
                       status=V1PodStatus(container_statuses=[V1ContainerStatus(
                           name="recipe", image="i", image_id="", ready=False, restart_count=0,
                           state=V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=code)))]))
                 for role, code in self.pods]
        return V1PodList(items=items)


class _FailedJob:
    def read_namespaced_job_status(self, name, namespace):
        from kubernetes.client import V1Job, V1JobStatus

        return V1Job(status=V1JobStatus(failed=1))


@pytest.mark.parametrize(("pods", "code"), [
    ([("", 2)], 2),  # bad input stays bad input: the worker does not retry it
    ([("", 137)], -9),  # SIGKILL (the out-of-memory killer): a crash, restarted from the checkpoint
    ([("worker", 1), ("master", 75)], 75),  # the master's code first
    ([], 1),  # the pods are gone: a failure without a code
])
def test_a_failed_run_reports_its_recipes_exit_code(tmp_path, pods, code):
    from tuneforge.scheduler.executors.kubernetes_jobs import KubernetesRun

    run = KubernetesRun(render_manifest(job_id="ftjob-1", attempt=1, spec=spec(gpu_type="cpu"), settings=SETTINGS,
                                        home=tmp_path))
    run.batch, run.core = _FailedJob(), _Pods(*pods)
    assert run.poll() == code
    assert run.core.selectors == ["tuneforge.dev/run=tuneforge-1-a1"]


class _FailedJobWithCondition:
    """A Job its podFailurePolicy failed, as the Job controller reports it (its pods already deleted)."""

    def __init__(self, code: int):
        self.code = code

    def read_namespaced_job_status(self, name, namespace):
        from kubernetes.client import V1Job, V1JobCondition, V1JobStatus

        message = (f"Container recipe for pod ml-train/{name}-x7k2p failed with exit code {self.code} matching "
                   "FailJob rule at index 0")
        return V1Job(status=V1JobStatus(failed=1, conditions=[
            V1JobCondition(type="FailureTarget", status="True", reason="PodFailurePolicy", message=message),
            V1JobCondition(type="Failed", status="True", reason="PodFailurePolicy", message=message)]))


def test_the_job_fails_on_the_recipes_first_exit_and_keeps_its_code_after_the_pods_are_gone(tmp_path):
    from tuneforge.scheduler.executors.kubernetes_jobs import KubernetesRun

    manifest = render_manifest(job_id="ftjob-1", attempt=1, spec=spec(gpu_type="cpu"), settings=SETTINGS, home=tmp_path)
    assert manifest["spec"]["backoffLimit"] == 0  # tuneforge restarts and re-queues, not the Job controller
    assert manifest["spec"]["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "recipe", "operator": "NotIn", "values": [0]}}]}
    for code, seen in ((75, 75), (2, 2), (137, -9)):  # preempted re-queued, bad input never retried, killed restarted
        run = KubernetesRun(manifest)
        run.batch, run.core = _FailedJobWithCondition(code), _Pods()
        assert run.poll() == seen
        assert run.core.selectors == []  # the Job's own status said it: no pod listing needed


def test_the_clusters_own_manifests_in_the_example_are_valid_kubernetes_objects():
    """examples/kubernetes/tuneforge.yaml, what the README has `kubectl apply`: each document against its kind's
    OpenAPI schema; the worker mounts the same PVC as the recipe pods, ReadWriteMany, and runs as the account
    the recipe pods are given."""
    import yaml

    from conftest import REPO

    documents = list(yaml.safe_load_all((REPO / "examples" / "kubernetes" / "tuneforge.yaml").read_text()))
    kinds = {"Namespace": "V1Namespace", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
             "ServiceAccount": "V1ServiceAccount", "Role": "V1Role", "RoleBinding": "V1RoleBinding",
             "Deployment": "V1Deployment"}
    assert sorted(doc["kind"] for doc in documents) == sorted(kinds)
    for doc in documents:
        jsonschema.Draft202012Validator(openapi_schema(getattr(kubernetes.client, kinds[doc["kind"]]))).validate(doc)
    by_kind = {doc["kind"]: doc for doc in documents}
    assert by_kind["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TUNEFORGE_K8S_PVC"] == pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == env["TUNEFORGE_HOME"]
    assert env["TUNEFORGE_K8S_SERVICE_ACCOUNT"] == pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    parse_inventory(env["TUNEFORGE_K8S_INVENTORY"])
    verbs = {(group, resource): rule["verbs"] for rule in by_kind["Role"]["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {"create", "get", "delete"} <= set(verbs[("batch", "jobs")]) and "list" in verbs[("", "pods")]
    assert {"create", "get", "delete"} <= set(verbs[("kubeflow.org", "pytorchjobs")])
