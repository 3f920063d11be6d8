"""The dataset registry on SQLite and PostgreSQL, through the API (in process, no scheduler): a processed
upload becomes v1, v2... of a name, the same content again is the same version, aliases move, a version an
alias or an unfinished job holds cannot be deleted and neither can a file a version holds, a job names a
dataset version and is pinned to its file (and so are a sweep and an eval run), the lineage names the version
the job trained on, and another tenant's datasets answer like missing ones. And the `tuneforge datasets` commands, and one tiny job through a
real server whose model's lineage names the dataset version it trained on."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tuneforge.db import dataset_versions as dataset_rows
from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.db.tables import AuditRecord
from tuneforge.registry.lineage import job_lineage
from tuneforge.settings import Settings

REPORT = {"valid": True, "format": "chat", "examples": 16, "problems": [], "problems_total": 0, "stats": {},
          "summary": "train.jsonl: 16 chat examples"}
MISSING_FILE = "file-000000000000000000000000"


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    upgrade(database.engine)
    yield database
    database.dispose()


@pytest.fixture
def api(db, database_url, tmp_path):
    """(client of tenant-a, client of tenant-b) on one in-process app."""
    settings = Settings.from_env(database_url=database_url)
    with db.session() as session:
        secrets = {t: tenant_rows.create_api_key(session, tenant_id=t)[1] for t in ("tenant-a", "tenant-b")}
    app = create_app_for(settings, db)
    with TestClient(app) as a, TestClient(app) as b:
        a.headers["Authorization"] = f"Bearer {secrets['tenant-a']}"
        b.headers["Authorization"] = f"Bearer {secrets['tenant-b']}"
        yield a, b


def create_app_for(settings, db):
    from tuneforge.api.app import create_app

    return create_app(settings, db=db)


def make_file(db: Database, *, tenant: str = "tenant-a", content: str = "a", status: str = "processed",
              filename: str = "train.jsonl", purpose: str = "fine-tune", report: dict = REPORT) -> str:
    """A file row as the scheduler leaves it once validated (the registry reads rows, never bytes)."""
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=tenant)
        row = file_rows.create_file(session, tenant_id=tenant, filename=filename, purpose=purpose,
                                    size=len(content) * 100, sha256=hashlib.sha256(content.encode()).hexdigest(),
                                    report=report if status == "processed" else {}, status=status, status_details=None)
        return row.id


def test_register_dedupes_by_content_and_versions_are_immutable(db, api):
    a, _ = api
    first = make_file(db, content="one")
    created = a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": first})
    assert created.status_code == 201, created.text
    v1 = created.json()
    assert (v1["name"], v1["version"], v1["file_id"], v1["filename"]) == ("support-chats", "v1", first, "train.jsonl")
    assert v1["sha256"] == hashlib.sha256(b"one").hexdigest() and v1["bytes"] == 300
    assert (v1["format"], v1["examples"], v1["source_version"]) == ("chat", 16, None) and v1["id"].startswith("dsv_")

    again = a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": first})
    assert again.status_code == 200 and again.json()["id"] == v1["id"]
    same_bytes = make_file(db, content="one", filename="copy.jsonl")  # uploaded again: same content, same version
    assert a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": same_bytes}).json()["id"] == v1["id"]

    cleaned = make_file(db, content="two", filename="clean.jsonl")
    v2 = a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": cleaned,
                                                                       "source_version": "support-chats@v1"})
    assert v2.status_code == 201 and v2.json()["version"] == "v2"
    assert v2.json()["source_version"] == {"id": v1["id"], "name": "support-chats", "version": "v1"}
    # v1's content again after v2 is a new version: only the newest is compared, as artifact registries do.
    assert a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": first}).json()["version"] == "v3"

    for ref in ("v2", "2", v2.json()["id"]):
        assert a.get(f"/v1/registry/datasets/support-chats/versions/{ref}").json()["file_id"] == cleaned
    assert a.get("/v1/registry/datasets/support-chats/versions/v9").status_code == 404
    # Nothing changes a version: no route to replace or edit one.
    assert a.put("/v1/registry/datasets/support-chats/versions/v1", json={"file_id": cleaned}).status_code == 405
    assert a.patch("/v1/registry/datasets/support-chats/versions/v1", json={"file_id": cleaned}).status_code == 405
    assert a.get("/v1/registry/datasets/support-chats/versions/v1").json() == {**v1, "aliases": [], "tags": {}}

    listed = a.get("/v1/registry/datasets/support-chats/versions", params={"limit": 2}).json()
    assert [v["version"] for v in listed["data"]] == ["v1", "v2"] and listed["has_more"] is True
    rest = a.get("/v1/registry/datasets/support-chats/versions", params={"after": listed["last_id"]}).json()
    assert [v["version"] for v in rest["data"]] == ["v3"] and rest["has_more"] is False
    tagged = a.post("/v1/registry/datasets/support-chats/versions/v2/tags", json={"key": "pii", "value": "scrubbed"})
    assert tagged.json()["tags"] == {"pii": "scrubbed"}
    assert a.delete("/v1/registry/datasets/support-chats/versions/v2/tags/pii").json()["deleted"] is True
    assert a.delete("/v1/registry/datasets/support-chats/versions/v2/tags/pii").status_code == 404
    with db.read_session() as session:  # every change is in the audit log, refused ones too
        actions = [(row.action, row.status) for row in session.scalars(select(AuditRecord).where(
            AuditRecord.tenant_id == "tenant-a").order_by(AuditRecord.seq))]
    assert actions[:2] == [("POST /v1/registry/datasets/{name}/versions", 201),
                           ("POST /v1/registry/datasets/{name}/versions", 200)]
    assert ("DELETE /v1/registry/datasets/{name}/versions/{version}/tags/{key}", 404) in actions


def test_only_a_processed_file_of_the_callers_with_a_valid_name_is_registered(db, api):
    a, _ = api
    pending, failed = make_file(db, content="p", status="uploaded"), make_file(db, content="f", status="error")
    for file_id, state in ((pending, "is still being validated"), (failed, "failed validation")):
        refused = a.post("/v1/registry/datasets/d/versions", json={"file_id": file_id})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_not_processed", refused.text
        assert state in refused.json()["error"]["message"]
    deleted = make_file(db, content="d")
    assert a.delete(f"/v1/files/{deleted}").status_code == 200
    assert a.post("/v1/registry/datasets/d/versions", json={"file_id": deleted}).status_code == 404
    bad = a.post("/v1/registry/datasets/Bad_Name/versions", json={"file_id": make_file(db, content="b")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    unknown = a.post("/v1/registry/datasets/d/versions", json={"file_id": make_file(db, content="s"),
                                                               "source_version": "nothing@v1"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "source_version"
    assert a.get("/v1/registry/datasets/d").status_code == 404  # nothing was half-registered


def test_aliases_move_and_hold_their_version(db, api):
    a, _ = api
    for content in ("one", "two"):
        a.post("/v1/registry/datasets/chats/versions", json={"file_id": make_file(db, content=content)})
    assert a.put("/v1/registry/datasets/chats/aliases", json={"alias": "clean", "version": "v1"}).json()[
        "aliases"] == {"clean": "v1"}
    moved = a.put("/v1/registry/datasets/chats/aliases", json={"alias": "clean", "version": "2"}).json()
    assert moved["aliases"] == {"clean": "v2"} and (moved["latest_version"], moved["versions"]) == ("v2", 2)
    assert a.get("/v1/registry/datasets/chats/versions/v2").json()["aliases"] == ["clean"]
    refused = a.delete("/v1/registry/datasets/chats/versions/v2")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert "alias 'clean' points at it" in refused.json()["error"]["message"]
    assert a.delete("/v1/registry/datasets/chats/aliases/clean").json()["deleted"] is True
    assert a.delete("/v1/registry/datasets/chats/aliases/clean").status_code == 404
    listed = a.get("/v1/registry/datasets").json()["data"]
    assert [(d["id"], d["latest_version"], d["aliases"]) for d in listed] == [("chats", "v2", {})]


def test_a_job_names_a_dataset_alias_is_pinned_to_its_file_and_holds_the_version(db, api, tmp_path):
    a, _ = api
    one, two = make_file(db, content="one"), make_file(db, content="two")
    v1 = a.post("/v1/registry/datasets/chats/versions", json={"file_id": one}).json()
    a.put("/v1/registry/datasets/chats/aliases", json={"alias": "prod", "version": "v1"})
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "dataset:chats:prod",
                                               "tuneforge": {"training": {"max_steps": 2}}})
    assert job.status_code == 200, job.text
    assert job.json()["training_file"] == one and job.json()["tuneforge"]["spec"]["dataset"]["path"] == one

    a.post("/v1/registry/datasets/chats/versions", json={"file_id": two})
    a.put("/v1/registry/datasets/chats/aliases", json={"alias": "prod", "version": "v2"})  # moved after creation
    assert a.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()["training_file"] == one
    by_number = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "dataset:chats@v2",
                                                     "validation_file": "dataset:chats:prod"})
    assert (by_number.json()["training_file"], by_number.json()["validation_file"]) == (two, two)
    for ref, code in (("dataset:chats@v7", "dataset_not_found"), ("dataset:chats:nope", "dataset_not_found"),
                      ("dataset:chats", "invalid_value"), ("dataset:Chats@v1", "invalid_value")):
        refused = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": ref})
        assert refused.status_code == 400, refused.text
        assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("training_file", code), ref
    assert a.post("/v1/fine_tuning/jobs/plan", json={"model": "tiny-llama",
                                                     "training_file": "dataset:chats:prod"}).status_code == 200

    # The first job may still run (queued: no worker here): v1 is held, and so is its file.
    a.delete("/v1/registry/datasets/chats/aliases/prod")
    refused = a.delete("/v1/registry/datasets/chats/versions/v1")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert f"job {job.json()['id']} (queued) trains on its file {one}" in refused.json()["error"]["message"]
    held = a.delete(f"/v1/files/{one}")
    assert held.status_code == 409 and held.json()["error"]["code"] == "file_in_use"
    assert "dataset chats v1 holds it" in held.json()["error"]["message"]

    # The lineage of what the job makes names the version it named, though the alias moved since.
    with db.session() as session:
        row = job_rows.get_job(session, tenant_id="tenant-a", job_id=job.json()["id"])
        lineage = job_lineage(session, job=row, job_dir=tmp_path, output=tmp_path)
    assert lineage["datasets"] == [{"role": "training", "file_id": one, "filename": "train.jsonl",
                                    "sha256": v1["sha256"], "bytes": 300, "dataset": "chats", "version": 1}]

    assert a.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel").status_code == 200
    deleted = a.delete("/v1/registry/datasets/chats/versions/v1")
    assert deleted.status_code == 200 and deleted.json() == {"object": "dataset.version", "id": v1["id"],
                                                             "deleted": True}
    assert a.get(f"/v1/files/{one}").json()["status"] == "processed"  # deleting a version keeps its file
    assert a.get("/v1/registry/datasets/chats/versions").json()["data"][0]["version"] == "v2"
    assert a.delete(f"/v1/files/{one}").status_code == 200  # no live version holds it now


def test_lineage_of_a_job_on_a_plain_file_id_names_the_newest_version_holding_it(db, api, tmp_path):
    a, _ = api
    file_id = make_file(db, content="one")
    a.post("/v1/registry/datasets/raw/versions", json={"file_id": file_id})
    a.post("/v1/registry/datasets/curated/versions", json={"file_id": file_id})
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()
    later = make_file(db, content="later")
    plain = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": later}).json()
    a.post("/v1/registry/datasets/late/versions", json={"file_id": later})  # after its job was created
    with db.session() as session:
        a_job = job_rows.get_job(session, tenant_id="tenant-a", job_id=job["id"])
        entry = job_lineage(session, job=a_job, job_dir=tmp_path, output=tmp_path)["datasets"][0]
        b_job = job_rows.get_job(session, tenant_id="tenant-a", job_id=plain["id"])
        b_job.created_at -= 5  # the version came later than the job (both within a second here)
        later_entry = job_lineage(session, job=b_job, job_dir=tmp_path, output=tmp_path)["datasets"][0]
        session.rollback()
    assert (entry["dataset"], entry["version"]) == ("curated", 1)
    assert "dataset" not in later_entry


def test_another_tenants_datasets_answer_like_missing_ones(db, api):
    a, b = api
    theirs = make_file(db, tenant="tenant-b", content="theirs")
    b.post("/v1/registry/datasets/secret/versions", json={"file_id": theirs})
    b.put("/v1/registry/datasets/secret/aliases", json={"alias": "prod", "version": "v1"})
    assert a.get("/v1/registry/datasets").json()["data"] == []
    for path in ("/v1/registry/datasets/secret", "/v1/registry/datasets/secret/versions",
                 "/v1/registry/datasets/secret/versions/v1"):
        got, missing = a.get(path), a.get(path.replace("secret", "nothing"))
        assert got.status_code == missing.status_code == 404
        assert got.text == missing.text.replace("nothing", "secret")
    got = a.post("/v1/registry/datasets/mine/versions", json={"file_id": theirs})
    missing = a.post("/v1/registry/datasets/mine/versions", json={"file_id": MISSING_FILE})
    assert got.status_code == 404 and got.text == missing.text.replace(MISSING_FILE, theirs)
    for ref in ("dataset:secret:prod", "dataset:secret@v1"):
        got = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": ref})
        missing = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama",
                                                       "training_file": ref.replace("secret", "nothing")})
        assert got.status_code == 400 and got.text == missing.text.replace("nothing", "secret")
    source = a.post("/v1/registry/datasets/mine/versions", json={"file_id": make_file(db, content="mine"),
                                                                 "source_version": "secret@v1"})
    assert source.status_code == 400 and source.json()["error"]["param"] == "source_version"
    assert b.get("/v1/registry/datasets/secret").json()["aliases"] == {"prod": "v1"}  # B's untouched
    with db.read_session() as session:
        assert dataset_rows.live_versions_of_file(session, tenant_id="tenant-a", file_id=theirs) == []


def sweep_body(path: str, validation_path: str | None = None) -> dict:
    dataset = {"path": path, **({"validation_path": validation_path} if validation_path else {})}
    return {"sampler": "grid", "objectives": [{"metric": "loss"}],
            "base": {"model": {"base_model": "tiny-llama"}, "dataset": dataset, "training": {"max_steps": 2},
                     "evaluation": {"metrics": ["loss"]}},
            "space": {"training.learning_rate": {"type": "choice", "values": [1e-4, 1e-3]}}}


def test_a_sweep_names_dataset_versions_pinned_to_their_files_and_holds_them(db, api):
    a, b = api
    one, two = make_file(db, content="one"), make_file(db, content="two")
    for file_id in (one, two):
        a.post("/v1/registry/datasets/chats/versions", json={"file_id": file_id})
    a.put("/v1/registry/datasets/chats/aliases", json={"alias": "prod", "version": "v1"})
    created = a.post("/v1/sweeps", json=sweep_body("dataset:chats:prod", "dataset:chats@v2"))
    assert created.status_code == 200, created.text
    sweep = created.json()
    assert (sweep["spec"]["base"]["dataset"]["path"], sweep["spec"]["base"]["dataset"]["validation_path"]) == (one, two)
    a.put("/v1/registry/datasets/chats/aliases", json={"alias": "prod", "version": "v2"})  # moved after creation
    assert a.get(f"/v1/sweeps/{sweep['id']}").json()["spec"]["base"]["dataset"]["path"] == one

    for body, param, code in ((sweep_body("dataset:chats@v9"), "base.dataset.path", "dataset_not_found"),
                              (sweep_body(one, "dataset:chats"), "base.dataset.validation_path", "invalid_value")):
        refused = a.post("/v1/sweeps", json=body)
        assert refused.status_code == 400, refused.text
        assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (param, code)
    theirs, missing = b.post("/v1/sweeps", json=sweep_body("dataset:chats:prod")), b.post(
        "/v1/sweeps", json=sweep_body("dataset:nothing:prod"))
    assert theirs.status_code == 400 and theirs.text == missing.text.replace("nothing", "chats")

    # Its later trials will name the files: neither can be deleted while it runs (a version no longer holds one).
    a.delete("/v1/registry/datasets/chats/aliases/prod")
    assert a.delete("/v1/registry/datasets/chats/versions/v1").status_code == 200
    held = a.delete(f"/v1/files/{one}")
    assert held.status_code == 409 and held.json()["error"]["code"] == "file_in_use"
    assert f"sweep {sweep['id']} (running) trains on it" in held.json()["error"]["message"]
    assert b.delete(f"/v1/files/{one}").status_code == 404  # not theirs to delete either way
    assert a.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 200
    assert a.delete(f"/v1/files/{one}").status_code == 200


EVAL_ITEMS_REPORT = {"valid": True, "examples": 2, "problems": [], "problems_total": 0,
                     "stats": {"items": 2, "items_with_sample": 2}, "summary": "items.jsonl: 2 eval items (2 with samples)"}


def test_an_eval_run_names_a_dataset_version_pinned_to_its_file_and_holds_it(db, api):
    a, b = api
    one, two = (make_file(db, content=c, filename="items.jsonl", purpose="evals", report=EVAL_ITEMS_REPORT)
                for c in ("one", "two"))
    for file_id in (one, two):
        a.post("/v1/registry/datasets/qa/versions", json={"file_id": file_id})
    a.put("/v1/registry/datasets/qa/aliases", json={"alias": "golden", "version": "v1"})
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    criteria = [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                 "reference": "{{item.answer}}", "operation": "eq"}]
    evaluation = a.post("/v1/evals", json={"data_source_config": {"type": "custom", "item_schema": schema},
                                           "testing_criteria": criteria}).json()

    def run(ref: str, client=a):
        return client.post(f"/v1/evals/{evaluation['id']}/runs", json={
            "data_source": {"type": "jsonl", "source": {"type": "file_id", "id": ref}}})

    created = run("dataset:qa:golden")
    assert created.status_code == 200, created.text
    assert created.json()["data_source"]["source"] == {"type": "file_id", "id": one, "dataset": "dataset:qa@v1"}
    job = job_of_run(db, created.json())
    assert job.training_file == one and job.spec["dataset"]["path"] == one
    a.put("/v1/registry/datasets/qa/aliases", json={"alias": "golden", "version": "v2"})  # moved after creation
    shown = a.get(f"/v1/evals/{evaluation['id']}/runs/{created.json()['id']}").json()
    assert shown["data_source"]["source"]["id"] == one
    assert run("dataset:qa@v2").json()["data_source"]["source"] == {"type": "file_id", "id": two,
                                                                    "dataset": "dataset:qa@v2"}

    for ref, code in (("dataset:qa@v9", "dataset_not_found"), ("dataset:qa", "invalid_value")):
        refused = run(ref)
        assert refused.status_code == 400, refused.text
        assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("data_source.source.id", code)
        assert refused.json()["error"]["message"].startswith("data_source.source.id: ")
    training = make_file(db, content="chats")
    a.post("/v1/registry/datasets/chats/versions", json={"file_id": training})
    assert "purpose 'evals'" in run("dataset:chats@v1").json()["error"]["message"]  # as a plain file id would
    b_eval = b.post("/v1/evals", json={"data_source_config": {"type": "custom", "item_schema": schema},
                                       "testing_criteria": criteria}).json()
    theirs = b.post(f"/v1/evals/{b_eval['id']}/runs", json={
        "data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "dataset:qa@v1"}}})
    assert theirs.status_code == 400 and theirs.json()["error"]["code"] == "dataset_not_found"

    # The run may still run (queued: no worker here): v1 is in use until it ends.
    refused = a.delete("/v1/registry/datasets/qa/versions/v1")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_in_use"
    assert a.post(f"/v1/evals/{evaluation['id']}/runs/{created.json()['id']}/cancel").status_code == 200
    assert a.delete("/v1/registry/datasets/qa/versions/v1").status_code == 200


def job_of_run(db: Database, run: dict):
    with db.session() as session:
        return job_rows.get_job_any_tenant(session, job_id=run["tuneforge"]["job_id"])


def test_a_local_sweep_reads_the_local_tenants_datasets(db):
    from tuneforge.sweep_cli import LOCAL_TENANT, SweepInputError, _local_data

    file_id = make_file(db, tenant=LOCAL_TENANT, content="local")
    with db.session() as session:
        from tuneforge.registry.dataset_versions import register_file

        register_file(session, file=file_rows.get_file(session, tenant_id=LOCAL_TENANT, file_id=file_id), name="chats")
    make_file(db, tenant="tenant-a", content="elsewhere")
    with db.session() as session:
        assert _local_data(session, None, "dataset:chats@v1", field="path") == file_id
        with pytest.raises(SweepInputError, match=r"base.dataset.validation_path: dataset 'chats' has no version or "
                           r"alias 'v2' \(a local sweep reads the datasets of tenant 'default'"):
            _local_data(session, None, "dataset:chats@v2", field="validation_path")


def test_datasets_command(db, database_url, tmp_path):
    file_id = make_file(db, content="one")
    env = {**os.environ, "TUNEFORGE_DATABASE_URL": database_url, "TUNEFORGE_HOME": str(tmp_path)}

    def cli(*args, code: int = 0) -> str:
        done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "datasets", *args, "--tenant", "tenant-a"],
                              env=env, capture_output=True, text=True)
        assert done.returncode == code, done.stderr
        return done.stdout + done.stderr

    assert '"version": "v1"' in cli("register", "chats", "--file", file_id)
    assert "chats:clean -> v1" in cli("alias", "chats@v1", "clean")
    assert "chats\tv1\t1 version(s)\taliases: clean=v1" in cli("list")
    assert f'"file_id": "{file_id}"' in cli("show", "chats:clean")
    assert "alias 'clean' points at it" in cli("delete", "chats@v1", code=2)
    cli("alias", "chats@v1", "clean", "--remove")
    assert f"deleted chats v1 (file {file_id} is kept)" in cli("delete", "chats@v1")


@pytest.mark.slow_on_postgresql  # a tiny training job through a real server and its worker: about 20 s
def test_a_finished_jobs_lineage_names_the_dataset_version_it_trained_on(tmp_path, database_url):
    import httpx
    from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated
    from test_registry_api import TINY, finished

    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", database_url)
    try:
        a = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"},
                         timeout=30)
        small = tmp_path / "train.jsonl"
        small.write_text("".join((EXAMPLE_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
        file = wait_validated(a, post_file(a, small)["id"])
        version = a.post("/v1/registry/datasets/support-chats/versions", json={"file_id": file["id"]}).json()
        assert (version["version"], version["examples"], version["format"]) == ("v1", 16, "chat")
        a.put("/v1/registry/datasets/support-chats/aliases", json={"alias": "clean", "version": "v1"})
        job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "dataset:support-chats:clean",
                                                   "suffix": "support-bot", "tuneforge": TINY})
        assert job.status_code == 200 and job.json()["training_file"] == file["id"], job.text
        finished(a, job.json()["id"], server)
        lineage = a.get("/v1/registry/models/support-bot/versions/v1").json()["lineage"]
        assert lineage["datasets"] == [{"role": "training", "file_id": file["id"], "filename": "train.jsonl",
                                        "sha256": version["sha256"], "bytes": version["bytes"],
                                        "dataset": "support-chats", "version": 1}]
        chain = a.get("/v1/registry/models/support-bot/versions/v1/lineage").json()["chain"]
        assert chain[0]["datasets"][0]["dataset"] == "support-chats"
    finally:
        server.stop()
