"""The Exports API against a real `tuneforge server`: choices deploy: refuses (an adapter export of a fully
fine-tuned model, a DoRA adapter for vLLM without fallback) answer 400 naming the rule, and nothing is
scheduled (default suite, no worker); and (slow) on the tiny model with a worker, a job's deploy: export is
recorded as an export of its model, a trained adapter is exported for vLLM as a job of method export, its
serve.json shows no server path, its files download as a tar stream, both name the version they came from and
the version's lineage lists both, another tenant's ids answer 404."""

from __future__ import annotations

import io
import tarfile
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


@pytest.fixture
def api_only_server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def http(server: ServerProcess, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=60)


def wait_status(client: httpx.Client, path: str, server: ServerProcess, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        assert "status" in body, f"{path}: {body}\n{server.log_text()[-4000:]}"
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{path} did not finish\n{server.log_text()[-4000:]}")


def registered_model(server: ServerProcess, client: httpx.Client, tenant: str, adapter: dict, kind: str) -> str:
    """A job with this adapter section (queued: no worker runs here) and its model, written as the worker
    registers a succeeded job's output."""
    from tuneforge.db import models as model_rows
    from tuneforge.db.session import Database

    file = wait_validated(client, post_file(client, EXAMPLE_DATA / "train.jsonl")["id"])
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"],
                                                    "tuneforge": {"adapter": adapter}})
    assert job.status_code == 200, job.text
    model_id = f"ft:tiny-llama:{tenant}::{job.json()['id'].removeprefix('ftjob-')}"
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        model_rows.create_model(session, model_id=model_id, tenant_id=tenant, job_id=job.json()["id"],
                                base_model="tiny-llama", kind=kind, location=f"jobs/{job.json()['id']}/{kind}")
    db.dispose()
    return model_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # API checks only: one database suffices
def test_choices_the_export_would_refuse_answer_400_naming_the_rule(api_only_server):
    server = api_only_server
    a, b = http(server, "tenant-a"), http(server, "tenant-b")
    full = registered_model(server, a, "tenant-a", {"type": "full"}, "model")
    refused = a.post(f"/v1/models/{full}/exports", json={"format": "adapter"})
    assert refused.status_code == 400, refused.text
    assert "adapter.type full trains every weight and has no adapter" in refused.json()["error"]["message"]
    dora = registered_model(server, a, "tenant-a", {"type": "lora", "use_dora": True}, "adapter")
    refused = a.post(f"/v1/models/{dora}/exports", json={"target": "vllm"})
    assert refused.status_code == 400 and "does not load DoRA adapters" in refused.json()["error"]["message"]
    unknown = a.post(f"/v1/models/{dora}/exports", json={"target": "triton"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "target", unknown.text
    assert a.get(f"/v1/models/{dora}/exports").json()["data"] == []  # nothing was scheduled
    # Asked for, the fallback merges it: accepted, an export job queued.
    merged = a.post(f"/v1/models/{dora}/exports", json={"target": "vllm", "fallback": "merged"})
    assert merged.status_code == 200 and merged.json()["status"] == "queued", merged.text
    assert [e["id"] for e in a.get(f"/v1/models/{dora}/exports").json()["data"]] == [merged.json()["id"]]
    assert b.post(f"/v1/models/{dora}/exports", json={}).status_code == 404  # not B's model
    assert a.get(f"/v1/models/{dora}/exports/{merged.json()['id']}/content").status_code == 409  # no files yet


@pytest.mark.slow
def test_an_adapter_exported_for_vllm_through_the_api(server):
    a, b = http(server, "tenant-a"), http(server, "tenant-b")
    file = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"], "tuneforge": {
        "training": {"max_steps": 2, "per_device_batch_size": 4}, "dataset": {"max_seq_length": 256},
        "evaluation": {"max_eval_examples": 2, "eval_before_training": False}, "deploy": {"target": "vllm"}}})
    assert job.status_code == 200, job.text
    trained = wait_status(a, f"/v1/fine_tuning/jobs/{job.json()['id']}", server)
    assert trained["status"] == "succeeded", trained["error"]
    model = trained["fine_tuned_model"]
    exports = f"/v1/models/{model}/exports"

    # deploy: in the spec exported the adapter when the job succeeded, recorded as an export of its model.
    (deployed,) = a.get(exports).json()["data"]
    assert (deployed["origin"], deployed["status"], deployed["format"]) == ("deploy", "succeeded", "adapter")
    assert deployed["source"]["version"] == "v1" and deployed["lineage"]["job_id"] == job.json()["id"]

    # Choices deploy: refuses are refused before anything is scheduled, naming what is wrong.
    wrong = a.post(exports, json={"format": "gguf", "target": "vllm"})
    assert wrong.status_code == 400 and "does not serve on target vllm" in wrong.json()["error"]["message"], wrong.text
    wrong = a.post(exports, json={"format": "merged", "fallback": "merged"})
    assert wrong.status_code == 400 and "fallback applies to adapter exports" in wrong.json()["error"]["message"]
    assert [e["id"] for e in a.get(exports).json()["data"]] == [deployed["id"]]

    created = a.post(exports, json={"format": "adapter", "target": "vllm", "gpu_type": "l4"})
    assert created.status_code == 200, created.text
    export_id = created.json()["id"]
    assert created.json()["status"] in ("queued", "running") and created.json()["descriptor"] is None
    done = wait_status(a, f"{exports}/{export_id}", server)
    assert done["status"] == "succeeded", done
    assert done["format"] == "adapter" and done["checks"]["server_rules"] == "vllm: all passed"
    command = done["descriptor"]["commands"]["vllm"]
    assert command.startswith("vllm serve $BASE_MODEL ") and "--lora-modules " in command
    assert "=adapter " in command and "--chat-template chat_template.jinja" in command
    assert "$BASE_MODEL" in done["placeholders"]
    assert done["origin"] == "export_job" and done["source"] == deployed["source"]
    assert done["lineage"]["source"]["version_id"] == deployed["source"]["version_id"]
    listed = a.get(exports).json()["data"]
    assert [e["id"] for e in listed] == [deployed["id"], export_id]
    traced = a.get(f"/v1/registry/models/{deployed['source']['name']}/versions/v1/lineage").json()
    assert [(e["id"], e["origin"]) for e in traced["exports"]] == [(deployed["id"], "deploy"), (export_id, "export_job")]
    assert traced["exports"][1]["manifest_sha256"] == done["lineage"]["manifest_sha256"]
    for text in (a.get(f"{exports}/{export_id}").text, a.get(exports).text):
        assert str(server.home) not in text and "/tmp" not in text  # no server path in any answer

    # The export job is the Exports API's: the fine-tuning jobs list does not show it.
    assert [j["id"] for j in a.get("/v1/fine_tuning/jobs").json()["data"]] == [job.json()["id"]]

    download = a.get(f"{exports}/{export_id}/content")
    assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        names = tar.getnames()
        assert {"serve.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "chat_template.jinja"} <= set(names), names
        assert all(not n.startswith("/") and ".." not in n for n in names)

    # The export is a registry artifact whose lineage names the model version it was made from.
    lineage = server.cli("models", "lineage", export_id, "--tenant", "tenant-a")
    assert lineage.startswith(f"export {export_id} (adapter for vllm, ") and f"({model})" in lineage, lineage
    assert "exported as:" in server.cli("models", "lineage", f"{trained['model']}@v1", "--tenant", "tenant-a")

    # Another tenant's model and export answer exactly like missing ones.
    for path in (exports, f"{exports}/{export_id}", f"{exports}/{export_id}/content"):
        assert b.get(path).status_code == 404, path
    assert b.post(exports, json={}).status_code == 404
    assert a.get(f"{exports}/export_000000000000000000000000").status_code == 404
