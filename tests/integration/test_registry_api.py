"""The registry through a real server with its worker: a job's adapter becomes support-bot v1 with its
lineage, an alias promotes it, a second job trains from `support-bot:production` through the API (the
worker materializes v1 from the store, the recipe merges it into tiny-llama and trains on), and the
lineage shows the chain; /v1/models lists the models and their checkpoints; deletion rules answer 409;
`tuneforge models lineage` and `download` (checked against the manifest) work from the command line."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

TINY = {"training": {"max_steps": 2, "batch_size": 2}, "dataset": {"max_seq_length": 512},
        "evaluation": {"max_eval_examples": 2, "max_new_tokens": 4, "eval_before_training": False},
        "adapter": {"rank": 4, "alpha": 8}, "checkpoint": {"every_steps": 1, "keep_last": 1}}


pytestmark = pytest.mark.slow  # two training jobs through a real server: about two minutes on two cores


@pytest.fixture
def server(tmp_path, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("the registry's queries run on PostgreSQL in test_registry_db; one database keeps CI short")
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


def finished(http: httpx.Client, job_id: str, server: ServerProcess) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", f"{job['error']}\n{server.log_text()[-4000:]}"
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']}\n{server.log_text()[-3000:]}")


def test_a_job_trains_from_a_previous_jobs_version_and_the_lineage_shows_the_chain(server, tmp_path):
    a = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"}, timeout=30)
    b = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-b']}"}, timeout=30)
    small = tmp_path / "train.jsonl"
    small.write_text("".join((EXAMPLE_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    file = wait_validated(a, post_file(a, small)["id"])
    assert file["status"] == "processed", file

    first = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"],
                                                 "suffix": "support-bot", "tuneforge": TINY})
    assert first.status_code == 200, first.text
    first = finished(a, first.json()["id"], server)
    v1 = a.get("/v1/registry/models/support-bot/versions/v1").json()
    assert v1["model"] == first["fine_tuned_model"] and v1["kind"] == "adapter"
    assert v1["lineage"]["job_id"] == first["id"] and v1["lineage"]["datasets"][0]["sha256"] == file_sha256(small)
    assert v1["lineage"]["libraries"]["torch"] and v1["lineage"]["chat_template_sha256"]
    assert {f["path"] for f in v1["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert v1["lineage"]["resolved_spec"]["dataset"]["path"] == file["id"] and str(server.home) not in json.dumps(v1)

    # OpenAI's list: the fine-tuned model and its kept checkpoint (keep_last 1: the last step's).
    listed = [m["id"] for m in a.get("/v1/models").json()["data"]]
    assert first["fine_tuned_model"] in listed and f"{first['fine_tuned_model']}:ckpt-step-2" in listed
    assert not [m for m in listed if ":ckpt-step-1" in m]
    assert first["fine_tuned_model"] not in b.get("/v1/models").text
    b_file = wait_validated(b, post_file(b, small)["id"])
    other = b.post("/v1/fine_tuning/jobs", json={"model": "support-bot@v1", "training_file": b_file["id"]}).json()
    assert (other["error"]["param"], other["error"]["code"]) == ("model", "model_not_found")

    assert a.put("/v1/registry/models/support-bot/aliases", json={"alias": "production", "version": "v1"}).json()[
        "aliases"] == {"production": "v1"}
    second = a.post("/v1/fine_tuning/jobs", json={"model": "support-bot:production", "training_file": file["id"],
                                                  "suffix": "support-bot", "tuneforge": TINY})
    assert second.status_code == 200, second.text
    assert second.json()["model"] == "support-bot:production"
    # While it may still run, v1 is held by the job and by the alias.
    refused = a.delete("/v1/registry/models/support-bot/versions/v1")
    assert refused.status_code == 409 and "alias 'production' points at it" in refused.json()["error"]["message"]
    second = finished(a, second.json()["id"], server)
    assert second["fine_tuned_model"].startswith("ft:tiny-llama:tenant-a:support-bot:")

    lineage = a.get("/v1/registry/models/support-bot/versions/v2/lineage").json()["chain"]
    assert [(step.get("version"), step["base_model"]["kind"]) for step in lineage] == [
        ("v2", "version"), ("v1", "builtin"), (None, "builtin")]
    assert lineage[0]["base_model"]["ref"] == first["fine_tuned_model"] and lineage[0]["job_id"] == second["id"]
    # The recipe trained on v1 merged into tiny-llama.
    resolved = a.get(f"/v1/fine_tuning/jobs/{second['id']}").json()
    assert resolved["model"] == "support-bot:production"

    printed = server.cli("models", "lineage", "support-bot@v2", "--tenant", "tenant-a")
    assert "support-bot v2" in printed and "support-bot v1" in printed and "base model tiny-llama" in printed
    out = tmp_path / "download"
    server.cli("models", "download", "support-bot:production", "--tenant", "tenant-a", "--out", str(out))
    for entry in v1["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]

    assert a.post("/v1/registry/models/support-bot/versions/v2/tags", json={"key": "eval", "value": "passed"}).json()[
        "tags"] == {"eval": "passed"}
    assert a.delete("/v1/registry/models/support-bot/aliases/production").status_code == 200
    refused = a.delete(f"/v1/models/{first['fine_tuned_model']}")
    assert refused.status_code == 409 and "support-bot v2 is an adapter trained on it" in refused.text
    assert a.delete("/v1/registry/models/support-bot/versions/v2").json()["deleted"] is True
    assert a.delete("/v1/registry/models/support-bot/versions/v1").json()["deleted"] is True
    assert a.get("/v1/registry/models/support-bot").status_code == 404
    assert json.loads(a.get("/v1/registry/models").text)["data"] == []


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
