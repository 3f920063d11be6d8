"""The HTTP API against a real `tuneforge server` process without a worker (jobs stay queued), on SQLite and
PostgreSQL: error shapes, bad files failing jobs with line-level reports, tenant isolation on every
endpoint, idempotency keys, cursor pagination, capacity and method checks at creation."""

from __future__ import annotations

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, chat, post_file, wait_validated, write_jsonl

QUEUED_FOREVER = {"training": {"max_steps": 2}}


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


class Api:
    def __init__(self, server: ServerProcess, tenant: str):
        self.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=30)

    def upload(self, path, name=None) -> dict:
        """Upload and wait until the scheduler has validated the file (processed or error)."""
        return wait_validated(self.http, post_file(self.http, path, name)["id"])

    def create(self, body: dict, **headers) -> httpx.Response:
        return self.http.post("/v1/fine_tuning/jobs", json=body, headers=headers)


def assert_error(response: httpx.Response, status: int, *, param=None, code=None, contains: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert param is None or error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert contains in error["message"], error
    return error


def test_errors_have_the_openai_shape(server):
    a = Api(server, "tenant-a")
    assert_error(httpx.get(server.url + "/v1/fine_tuning/jobs"), 401, code="missing_api_key")
    assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer tf-nope"}), 401, code="invalid_api_key")
    assert_error(a.http.get("/v1/nothing-here"), 404, code="not_found")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    base = {"model": "tiny-llama", "training_file": training["id"]}
    assert_error(a.create({"training_file": training["id"]}), 400, param="model", contains="missing")
    assert_error(a.create({**base, "n_epochs": 3}), 400, param="n_epochs", contains="unknown parameter")
    assert_error(a.create({**base, "model": "gpt-9"}), 400, param="model", code="model_not_found")
    assert_error(a.create({**base, "training_file": "file-missing"}), 400, param="training_file", code="file_not_found")
    dpo_on_chats = a.create({**base, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}})
    assert dpo_on_chats.status_code == 200, dpo_on_chats.text
    assert dpo_on_chats.json()["status"] == "failed" and dpo_on_chats.json()["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    assert dpo_on_chats.json()["error"]["code"] == "invalid_training_file"
    assert "trains on preference records" in dpo_on_chats.json()["error"]["message"]
    assert_error(a.create({**base, "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "python", "name": "p", "source": "import os"}}}}), 400, contains="arbitrary code")
    assert_error(a.create({**base, "method": {"type": "ppo"}, "tuneforge": {"rollout": {
        "reward_model": "ft:tiny-llama:tenant-b::abc"}}}), 400, param="tuneforge.rollout.reward_model",
        code="model_not_found")
    assert_error(a.create({**base, "tuneforge": {"training": {"learnin_rate": 1e-4}}}), 400,
                 param="tuneforge.training.learnin_rate", contains="did you mean 'learning_rate'")
    assert_error(a.create({**base, "tuneforge": {"dataset": {"path": "/etc/passwd"}}}), 400, param="tuneforge.dataset.path")
    assert_error(a.create({**base, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}),
                 400, param="method.supervised.hyperparameters.n_epochs")
    assert_error(a.create({**base, "seed": 1, "tuneforge": {"training": {"seed": 2}}}), 400, param="seed")
    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle:
        assert_error(a.http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("t.jsonl", handle)}), 400,
                     param="purpose")
    # Nothing of the refused requests was kept (the DPO job on chat data exists, failed by admission).
    assert [job["id"] for job in a.http.get("/v1/fine_tuning/jobs").json()["data"]] == [dpo_on_chats.json()["id"]]


def test_invalid_training_file_fails_the_job_with_line_level_report(server, tmp_path):
    a = Api(server, "tenant-a")
    records = [chat(f"q{i}", f"a{i}") for i in range(12)]
    records[2] = '{"messages": [{"role": "user", "content": "hi"}'  # line 3: not JSON
    records[6] = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}  # line 7
    bad = a.upload(write_jsonl(tmp_path / "bad.jsonl", records))
    assert bad["status"] == "error" and "bad.jsonl:3" in bad["status_details"]
    assert str(tmp_path) not in bad["status_details"]
    report = a.http.get(f"/v1/files/{bad['id']}/validation").json()
    assert report["valid"] is False and [p["line"] for p in report["problems"]] == [3, 7]
    assert report["problems"][1]["field"] == "messages[0].role"

    job = a.create({"model": "tiny-llama", "training_file": bad["id"]}).json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_training_file"
    assert job["error"]["param"] == "training_file"
    assert "bad.jsonl:3" in job["error"]["message"] and "bad.jsonl:7" in job["error"]["message"]

    few = a.upload(write_jsonl(tmp_path / "few.jsonl", [chat("q", "a")] * 3))
    assert few["status"] == "processed"
    job = a.create({"model": "tiny-llama", "training_file": few["id"]}).json()
    assert job["status"] == "failed" and "at least 10" in job["error"]["message"]

    good = a.upload(EXAMPLE_DATA / "train.jsonl")
    stats = a.http.get(f"/v1/files/{good['id']}/validation").json()
    assert stats["valid"] and stats["format"] == "chat" and stats["examples"] == 320
    assert stats["stats"]["assistant_messages"] == 320
    content = a.http.get(f"/v1/files/{good['id']}/content")
    assert content.content == (EXAMPLE_DATA / "train.jsonl").read_bytes()


def test_tenants_see_only_their_own_objects(server):
    a, b = Api(server, "tenant-a"), Api(server, "tenant-b")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    job = a.create({"model": "tiny-llama", "training_file": training["id"], "tuneforge": QUEUED_FOREVER}).json()
    assert job["status"] == "queued" and job["organization_id"] == "tenant-a"

    missing = {}
    for path in (f"/v1/files/{training['id']}", f"/v1/files/{training['id']}/content", f"/v1/files/{training['id']}/validation",
                 f"/v1/fine_tuning/jobs/{job['id']}", f"/v1/fine_tuning/jobs/{job['id']}/events",
                 f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", f"/v1/fine_tuning/jobs/{job['id']}/metrics",
                 f"/v1/fine_tuning/jobs/{job['id']}/events/stream"):
        theirs, nobody = b.http.get(path), b.http.get(path.replace(training["id"], "file-0").replace(job["id"], "ftjob-0"))
        assert theirs.status_code == nobody.status_code == 404, path
        assert theirs.json()["error"]["code"] == nobody.json()["error"]["code"] == "not_found"
        missing[path] = theirs.json()["error"]["message"]
    for action in ("cancel", "pause", "resume"):
        assert_error(b.http.post(f"/v1/fine_tuning/jobs/{job['id']}/{action}"), 404, code="not_found")
    assert_error(b.http.delete(f"/v1/files/{training['id']}"), 404)
    assert_error(b.create({"model": "tiny-llama", "training_file": training["id"]}), 400, param="training_file")
    assert b.http.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert b.http.get("/v1/files").json()["data"] == []
    assert a.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]


def test_idempotency_key_returns_the_same_job_and_rejects_a_different_body(server):
    a, b = Api(server, "tenant-a"), Api(server, "tenant-b")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    body = {"model": "tiny-llama", "training_file": training["id"], "tuneforge": QUEUED_FOREVER}
    first = a.create(body, **{"Idempotency-Key": "retry-1"}).json()
    again = a.create(body, **{"Idempotency-Key": "retry-1"}).json()
    assert again["id"] == first["id"]
    assert_error(a.create({**body, "suffix": "other"}, **{"Idempotency-Key": "retry-1"}), 409, code="idempotency_key_reused")
    assert len(a.http.get("/v1/fine_tuning/jobs").json()["data"]) == 1
    # Keys are per tenant: the same key from another tenant is a new request.
    b_file = b.upload(EXAMPLE_DATA / "train.jsonl")
    other = b.create({**body, "training_file": b_file["id"]}, **{"Idempotency-Key": "retry-1"}).json()
    assert other["id"] != first["id"]


def test_cursor_pagination_and_job_actions_on_queued_jobs(server):
    a = Api(server, "tenant-a")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    ids = [a.create({"model": "tiny-llama", "training_file": training["id"], "metadata": {"n": str(i)},
                     "tuneforge": QUEUED_FOREVER}).json()["id"] for i in range(5)]
    pages, after = [], None
    while True:
        query = {"limit": 2, **({"after": after} if after else {})}
        page = a.http.get("/v1/fine_tuning/jobs", params=query).json()
        pages.append([job["id"] for job in page["data"]])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert pages == [ids[::-1][0:2], ids[::-1][2:4], ids[::-1][4:5]]
    second = a.upload(EXAMPLE_DATA / "val.jsonl")
    files = a.http.get("/v1/files", params={"limit": 1}).json()
    assert [f["id"] for f in files["data"]] == [second["id"]] and files["has_more"]
    rest = a.http.get("/v1/files", params={"limit": 1, "after": second["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [training["id"]] and not rest["has_more"]
    oldest_first = a.http.get("/v1/files", params={"order": "asc"}).json()["data"]
    assert [f["id"] for f in oldest_first] == [training["id"], second["id"]]
    filtered = a.http.get("/v1/fine_tuning/jobs", params={"metadata[n]": "3"}).json()["data"]
    assert [job["id"] for job in filtered] == [ids[3]]

    assert a.http.post(f"/v1/fine_tuning/jobs/{ids[0]}/pause").json()["status"] == "paused"
    resumed = a.http.post(f"/v1/fine_tuning/jobs/{ids[0]}/resume").json()
    assert resumed["status"] == "queued" and resumed["tuneforge"]["attempt"] == 2
    assert a.http.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel").json()["status"] == "cancelled"
    assert_error(a.http.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel"), 409, code="invalid_job_state")
    events = a.http.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"limit": 2}).json()
    assert events["has_more"] and [e["message"] for e in events["data"]] == ["Job resumed and queued", events["data"][1]["message"]]
    rest = a.http.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", params={"after": events["data"][-1]["id"]}).json()["data"]
    assert rest[-1]["message"].startswith("Validating training file")


def test_jobs_that_no_worker_can_hold_are_refused_at_creation(server):
    from tuneforge.db import workers as worker_rows
    from tuneforge.db.session import Database

    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        worker_rows.register_worker(session, worker_id="gpu-box", hostname="gpu-box", executor="local",
                                    inventory=[{"gpu_type": "a100-80gb", "gpus": 8}])
    db.dispose()
    a = Api(server, "tenant-a")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    body = {"model": "tiny-llama", "training_file": training["id"]}
    error = assert_error(a.create({**body, "tuneforge": {"resources": {"num_gpus": 16}}}), 400, code="insufficient_capacity")
    assert "8 x a100-80gb" in error["message"]
    assert_error(a.create({**body, "tuneforge": {"resources": {"num_gpus": 1, "gpu_type": "h100-80gb"}}}), 400,
                 code="insufficient_capacity")
    plan = a.http.post("/v1/fine_tuning/jobs/plan", json={**body, "tuneforge": {"resources": {"num_gpus": 4}}}).json()
    assert plan["fits"] is True and plan["gpus"] == 4
    fits = a.create({**body, "tuneforge": {"resources": {"num_gpus": 8, "gpu_type": "a100-80gb"}, **QUEUED_FOREVER}})
    assert fits.status_code == 200 and fits.json()["status"] == "queued"
    assert a.http.get("/v1/fine_tuning/jobs").json()["data"][0]["id"] == fits.json()["id"]
    assert plan["memory"]["fits"] is True and plan["memory"]["memory_bytes"]["total"] > 0

    # The GPUs are there, but the memory planner says the job cannot fit them: refused before it is queued.
    huge = {"resources": {"num_gpus": 1, "gpu_type": "a100-80gb"}, "adapter": {"type": "full"},
            "dataset": {"max_seq_length": 1 << 17}, "training": {"gradient_checkpointing": False}}
    error = assert_error(a.create({"model": "smollm2-135m-instruct", "training_file": training["id"], "tuneforge": huge}),
                         400, code="insufficient_memory")
    assert "Does not fit" in error["message"] and "Options: turn on gradient checkpointing" in error["message"]
    plan = a.http.post("/v1/fine_tuning/jobs/plan", json={"model": "smollm2-135m-instruct",
                                                            "training_file": training["id"], "tuneforge": huge}).json()
    assert plan["fits"] is False and plan["memory"]["fits"] is False


def test_a_deepspeed_job_with_an_unusable_config_is_refused_at_creation(server):
    a = Api(server, "tenant-a")
    training = a.upload(EXAMPLE_DATA / "train.jsonl")
    body = {"model": "tiny-llama", "training_file": training["id"],
            "tuneforge": {"resources": {"num_gpus": 2, "strategy": "deepspeed",
                                        "deepspeed_config": {"zero_optimization": {"stage": 1}}},
                          "training": {"batch_size": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 1}}}
    error = assert_error(a.create(body), 400, param="tuneforge.resources.deepspeed_config", code="invalid_strategy")
    assert "zero_optimization.stage 1: tuneforge runs ZeRO stage 2 or 3" in error["message"]
