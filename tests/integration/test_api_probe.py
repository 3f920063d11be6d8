"""The attacks an API probe found, replayed against a real `tuneforge server` process (no worker): each test
performs one and asserts it fails safely -- nothing read or written outside the job directory, no 500,
no torch in the API process, no tenant created by a typo, nothing of a deleted model left on disk."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def client(server: ServerProcess, tenant: str = "tenant-a") -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=30)


def admin(server: ServerProcess) -> httpx.Client:
    secret = (server.home / "admin-key").read_text().strip()
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def upload(http: httpx.Client, path: Path = EXAMPLE_DATA / "train.jsonl") -> dict:
    file = wait_validated(http, post_file(http, path)["id"])  # validated by the scheduler
    assert file["status"] == "processed", file
    return file


def error_of(response: httpx.Response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert param is None or error["param"] == param, error
    assert code is None or error["code"] == code, error
    return error


def deepspeed_job(training: str, config) -> dict:
    return {"model": "tiny-llama", "training_file": training,
            "tuneforge": {"resources": {"num_gpus": 2, "strategy": "deepspeed", "deepspeed_config": config},
                          "training": {"max_steps": 2}}}


def test_deepspeed_config_can_name_no_server_path_and_no_output_location(server, tmp_path):
    a = client(server)
    training = upload(a)["id"]
    # Defect 1: a path was read by the API process; its errors told whether it existed and echoed its keys.
    secret = tmp_path / "secret.json"
    secret.write_text('{"zero_optimization": {"stage": 3}, "api_token": "hunter2"}')
    binary = tmp_path / "binary.bin"
    binary.write_bytes(os.urandom(4096))
    answers = set()
    for path in (str(secret), str(tmp_path / "missing.json"), str(binary), "/etc/passwd", str(server.home)):
        error = error_of(a.post("/v1/fine_tuning/jobs", json=deepspeed_job(training, path)), 400,
                         param="tuneforge.resources.deepspeed_config")
        assert "hunter2" not in error["message"] and "api_token" not in error["message"]
        answers.add(error["message"].split(", got")[0])
    assert len(answers) == 1, answers  # the same answer whether the path exists, is JSON or is binary: no oracle
    assert "a JSON object" in answers.pop()

    # Inline configs that would make a worker write where the job says are refused by key.
    target = tmp_path / "written-by-deepspeed"
    attacks = {
        "flops_profiler.output_file": {"zero_optimization": {"stage": 3}, "flops_profiler": {"enabled": True,
                                                                                            "output_file": str(target)}},
        "offload_param.nvme_path": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu",
                                                                                       "nvme_path": str(target)}}},
        "tensorboard": {"zero_optimization": {"stage": 3}, "tensorboard": {"enabled": True, "output_path": str(target)}},
        "csv_monitor": {"zero_optimization": {"stage": 3}, "csv_monitor": {"enabled": True, "output_path": str(target)}},
    }
    for named, config in attacks.items():
        error = error_of(a.post("/v1/fine_tuning/jobs", json=deepspeed_job(training, config)), 400,
                         param="tuneforge.resources.deepspeed_config", code="invalid_strategy")
        assert named in error["message"], error
        plan = a.post("/v1/fine_tuning/jobs/plan", json=deepspeed_job(training, config)).json()
        assert plan["fits"] is False and named in plan["reason"]
    assert not target.exists()
    assert a.get("/v1/fine_tuning/jobs").json()["data"] == []
    # A harmless inline config is accepted and carried by content.
    fine = a.post("/v1/fine_tuning/jobs", json=deepspeed_job(training, {"zero_optimization": {"stage": 2}}))
    assert fine.status_code == 200, fine.text
    assert fine.json()["tuneforge"]["spec"]["resources"]["deepspeed_config"] == {"zero_optimization": {"stage": 2}}


def test_the_api_process_never_imports_torch_to_check_a_job(server):
    a = client(server)
    training = upload(a)["id"]
    for body in (deepspeed_job(training, {"zero_optimization": {"stage": 3}}),
                 {"model": "smollm2-135m-instruct", "training_file": training,
                  "tuneforge": {"adapter": {"type": "qlora"}, "training": {"max_steps": 2}}}):
        assert a.post("/v1/fine_tuning/jobs/plan", json=body).status_code == 200
        assert a.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "deepspeed" not in maps


OUT_OF_RANGE = [
    ("resources.num_gpus", 2**70, "tuneforge.resources.num_gpus"),
    ("resources.num_nodes", 2**70, "tuneforge.resources.num_nodes"),
    ("training.max_steps", 2**63, "tuneforge.training.max_steps"),
    ("training.seed", 2**40, "tuneforge.training.seed"),
    ("dataset.max_seq_length", 10**12, "tuneforge.dataset.max_seq_length"),
    ("adapter.target_modules", ["q_proj"] * 2000, "tuneforge.adapter.target_modules"),
    ("adapter.target_modules", ["q_proj; import os"], "tuneforge.adapter.target_modules.0"),
    ("checkpoint.keep_last", 10**9, "tuneforge.checkpoint.keep_last"),
]


def test_out_of_range_numbers_and_huge_lists_are_400s_naming_the_field(server):
    a = client(server)
    training = upload(a)["id"]
    for field, value, param in OUT_OF_RANGE:
        section, key = field.split(".")
        body = {"model": "tiny-llama", "training_file": training, "tuneforge": {section: {key: value}}}
        error_of(a.post("/v1/fine_tuning/jobs", json=body), 400, param=param)
    error_of(a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training, "seed": 2**70}),
             400, param="seed")
    error_of(a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training,
                                                  "hyperparameters": {"n_epochs": 10**400}}), 400)
    assert a.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_oversized_query_values_bodies_and_malformed_json_are_400s_not_500s(server):
    a = client(server)
    training = upload(a)["id"]
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training,
                                               "tuneforge": {"training": {"max_steps": 2}}}).json()
    error_of(a.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"after_step": 10**23}), 400, param="after_step")
    assert a.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"after_step": 3}).status_code == 200
    error = error_of(a.post("/v1/fine_tuning/jobs", content=b'{"model": "tiny-llama",', headers={
        "Content-Type": "application/json"}), 400, code="invalid_json")
    assert error["param"] is None and "not valid JSON" in error["message"]
    # A 2.3 MB job request is refused on its Content-Length, and a chunked one once it passes the limit.
    huge = {"model": "tiny-llama", "training_file": training, "metadata": {"pad": "x" * (2_300_000)}}
    error_of(a.post("/v1/fine_tuning/jobs", json=huge), 413, code="request_too_large")
    chunks = (b"x" * 65536 for _ in range(64))
    error_of(a.post("/v1/fine_tuning/jobs", content=chunks, headers={"Content-Type": "application/json"}), 413,
             code="request_too_large")
    assert a.get("/health").status_code == 200
    assert len(a.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_tenants_are_created_explicitly_with_valid_names(server):
    root = admin(server)
    error_of(root.put("/v1/tuneforge/tenants/no-such-tenant/limits", json={"max_gpus": 4}), 404, code="tenant_not_found")
    error_of(root.put("/v1/tuneforge/tenants/Bad%20Name!/limits", json={"max_gpus": 4}), 400, param="tenant_id")
    error_of(root.post("/v1/tuneforge/keys", json={"tenant": "typo-tenant"}), 404, code="tenant_not_found")
    error_of(root.post("/v1/tuneforge/tenants", json={"name": "../etc"}), 400, param="name")
    created = root.post("/v1/tuneforge/tenants", json={"name": "acme", "max_gpus": 8})
    assert created.status_code == 200 and created.json()["id"] == "acme" and created.json()["max_gpus"] == 8
    error_of(root.post("/v1/tuneforge/tenants", json={"name": "acme"}), 409, code="tenant_exists")
    assert root.put("/v1/tuneforge/tenants/acme/limits", json={"max_gpus": 2}).json()["max_gpus"] == 2
    key = root.post("/v1/tuneforge/keys", json={"tenant": "acme"}).json()["key"]
    acme = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
    assert acme.get("/v1/files").status_code == 200
    # Only admins manage tenants.
    error_of(client(server).post("/v1/tuneforge/tenants", json={"name": "mine"}), 403)


def test_the_plan_shows_capacity_without_worker_identities(server):
    from tuneforge.db import workers as worker_rows
    from tuneforge.db.session import Database

    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        worker_rows.register_worker(session, worker_id="gpu-box-7.internal-4242-abc", hostname="gpu-box-7.internal",
                                    executor="local", inventory=[{"gpu_type": "a100-80gb", "gpus": 8}])
    db.dispose()
    a = client(server)
    training = upload(a)["id"]
    plan = a.post("/v1/fine_tuning/jobs/plan", json={"model": "tiny-llama", "training_file": training})
    assert plan.status_code == 200
    assert "gpu-box-7" not in plan.text and "4242" not in plan.text
    assert {"executor": "local", "nodes": [{"gpu_type": "a100-80gb", "gpus": 8}]} in plan.json()["capacity"]


def test_deleting_a_model_removes_its_adapter_and_checkpoints_and_nothing_outside_home(server, tmp_path):
    from tuneforge.db import models as model_rows
    from tuneforge.db.session import Database
    from tuneforge.db.tables import JobCheckpoint

    a = client(server)
    training = upload(a)["id"]
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training,
                                               "tuneforge": {"training": {"max_steps": 2}}}).json()
    job_dir = server.home / "jobs" / job["id"]
    (job_dir / "adapter").mkdir(parents=True)
    (job_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (job_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (job_dir / "checkpoints" / "step-2" / "manifest.json").write_text("{}")
    outside = tmp_path / "outside"
    (outside / "adapter").mkdir(parents=True)
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        model_rows.create_model(session, model_id="ft:tiny-llama:tenant-a::one", tenant_id="tenant-a", job_id=job["id"],
                                base_model="tiny-llama", kind="adapter", location=f"jobs/{job['id']}/adapter")
        session.add(JobCheckpoint(id="ftckpt-1", job_id=job["id"], step=2, created_at=1, path="checkpoints/step-2",
                                  metrics={}))
        model_rows.create_model(session, model_id="ft:tiny-llama:tenant-a::two", tenant_id="tenant-a", job_id=job["id"],
                                base_model="tiny-llama", kind="adapter", location=os.path.relpath(outside / "adapter", server.home))
    db.dispose()
    assert client(server, "tenant-b").delete("/v1/models/ft:tiny-llama:tenant-a::one").status_code == 404
    assert (job_dir / "adapter").is_dir()
    assert a.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert a.delete("/v1/models/ft:tiny-llama:tenant-a::one").json()["deleted"] is True
    assert not (job_dir / "adapter").exists() and not (job_dir / "checkpoints").exists()
    assert a.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert "ft:tiny-llama:tenant-a::one" not in a.get("/v1/models").text
    # A row whose location escapes TUNEFORGE_HOME never makes the server delete there.
    assert a.delete("/v1/models/ft:tiny-llama:tenant-a::two").json()["deleted"] is True
    assert (outside / "adapter").is_dir()
    assert "outside TUNEFORGE_HOME" in server.log_text()


def test_home_and_database_are_private_and_an_admin_key_exists_even_after_keys_create(server):
    # ServerProcess runs `tuneforge keys create` twice before the first start, as the README's order did.
    assert (server.home / "admin-key").is_file(), server.log_text()[-2000:]
    assert "created the admin key" in server.log_text()
    assert admin(server).post("/v1/tuneforge/tenants", json={"name": "ops"}).status_code == 200
    assert stat.S_IMODE(server.home.stat().st_mode) == 0o700
    assert stat.S_IMODE((server.home / "admin-key").stat().st_mode) == 0o600
    if server.env["TUNEFORGE_DATABASE_URL"].startswith("sqlite"):
        database = Path(server.env["TUNEFORGE_DATABASE_URL"][len("sqlite:///"):])
        for path in (database, database.with_name(database.name + "-wal")):
            if path.exists():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    a = client(server)
    upload(a)
    for path in server.home.rglob("*"):
        if path.is_file() and path.name != "server.log":
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_job_creation_holds_no_write_lock_while_it_checks(tmp_path, monkeypatch):
    """The capacity, memory and strategy checks run before the write transaction opens: another writer
    (an upload, a claim) gets SQLite's lock at once while they run."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from tuneforge.api import app as app_module
    from tuneforge.api.routers import jobs as jobs_router
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.db.tables import File
    from tuneforge.registry.datasets import inspect_dataset
    from tuneforge.settings import Settings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = Database(url)
    upgrade(db.engine)
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="tenant-a")
    app = app_module.create_app(Settings.from_env(database_url=url), db=db)
    real_check, waits = jobs_router.check_submission, []

    def check_while_another_writes(spec, inventories):
        other = Database(url)
        started = time.monotonic()
        with other.session() as session:  # BEGIN IMMEDIATE: waits if the request held the write lock
            tenant_rows.create_tenant(session, tenant_id=f"t{len(waits)}")
        waits.append(time.monotonic() - started)
        other.dispose()
        return real_check(spec, inventories)

    monkeypatch.setattr(jobs_router, "check_submission", check_while_another_writes)
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {secret}"
        with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle:
            file_id = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", handle)}).json()["id"]
        with db.session() as session:  # no scheduler here: mark the upload validated as the scheduler would
            row = session.scalar(select(File).where(File.id == file_id))
            if row.status == "uploaded":
                row.report = inspect_dataset(EXAMPLE_DATA / "train.jsonl", display_name="t.jsonl").model_dump(mode="json")
                row.status = "processed"
        body = {"model": "tiny-llama", "training_file": file_id, "tuneforge": {"training": {"max_steps": 2}}}
        assert http.post("/v1/fine_tuning/jobs", json=body).status_code == 200
        assert http.post("/v1/fine_tuning/jobs/plan", json=body).status_code == 200
    assert len(waits) == 2 and max(waits) < 1.0, waits
    db.dispose()
