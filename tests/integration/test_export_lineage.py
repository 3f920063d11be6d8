"""Exports as registry artifacts, against real SQLite and PostgreSQL: a succeeded export's files go into the
content-addressed store (owned by the export, so the collector keeps them), its lineage names the model version
it was made from and survives that version's deletion, and `tuneforge models lineage` shows it both ways (the
export's id -> the version and its chain; the version -> its exports). Another tenant's export id is unknown.
deploy: in a training job's spec is recorded the same way when the job's output is registered, and the API shows
the lineage both ways too: an export object names its source version and its recorded lineage, a version's
lineage lists its exports (deploy:, Exports API, one still queued)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_registry_db import db, make_job, register, write_output  # noqa: F401 - db is the fixture

from tuneforge.cli import main
from tuneforge.db import exports as export_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.exports import LINEAGE_PATH, export_artifact, exports_of_version, register_export
from tuneforge.registry.models import delete_model_and_version, register_job_output
from tuneforge.registry.versions import manifest_digest, verify_directory
from tuneforge.scheduler import states
from tuneforge.spec import validate_job_spec
from tuneforge.settings import Settings
from tuneforge.spec.jobdir import ENVIRONMENT_FILE, EXPORT_DIR, Deployment, Evaluation, JobSummary, write_summary
from tuneforge.spec.job import NO_DATASET


def export_job(db, home: Path, *, model_id: str, tenant: str = "t") -> tuple[str, str, Path]:
    """An export job of model_id as the Exports API schedules it, with the files its recipe writes."""
    spec = validate_job_spec({"method": "export", "name": "support-bot", "model": {"base_model": "tiny-llama"},
                              "dataset": {"path": NO_DATASET}, "export_run": {"model": model_id},
                              "deploy": {"target": "vllm", "format": "adapter", "fallback": "merged"}})
    with db.session() as session:
        job = job_rows.create_job(session, tenant_id=tenant, spec=spec, model=model_id, training_file="",
                                  validation_file=None, suffix=None, metadata=None)
        assert states.admit(session, job_id=job.id)
        export = export_rows.create_export(session, tenant_id=tenant, model_id=model_id, job_id=job.id)
        job_id, export_id = job.id, export.id
    job_dir = home / "jobs" / job_id
    write_export(job_dir, home)
    return job_id, export_id, job_dir


def write_export(job_dir: Path, home: Path) -> None:
    """DIR/export as an adapter export for vLLM writes it (the export job's recipe, or a training job's deploy:)."""
    out = job_dir / EXPORT_DIR
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"exported-weights")
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "serve.json").write_text(json.dumps({
        "format": "adapter", "fallback_from": None, "model_path": str(home / "models" / "tiny-llama"),
        "checks": {"server_rules": "vllm: all passed", "adapter": str(out / "adapter")},
        "commands": {"vllm": f"vllm serve {home}/models/tiny-llama --enable-lora"}}))
    (job_dir / ENVIRONMENT_FILE).write_text(json.dumps({"torch": "2.13.0", "peft": "1"}))


def lineage_output(capsys, *args: str) -> str:
    capsys.readouterr()
    code = main(["models", "lineage", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_an_export_is_an_artifact_whose_lineage_names_its_source_version(db, tmp_path, monkeypatch, capsys):
    home = Path(os.environ["TUNEFORGE_HOME"])
    store = LocalArtifactStore(tmp_path / "artifacts")
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", db.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("TUNEFORGE_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    trained, _ = make_job(db)
    model_id = register(db, store, home, trained, b"weights-one")
    job_id, export_id, job_dir = export_job(db, home, model_id=model_id)

    with db.session() as session:
        version = version_rows.version_of_model(session, tenant_id="t", model_id=model_id)
        export = export_rows.get_export_any_model(session, tenant_id="t", export_id=export_id)
        assert export_artifact(session, store, export=export) is None  # nothing recorded before it succeeded
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        recorded = register_export(session, store, job=job, job_dir=job_dir)
    with db.session() as session:
        export = export_rows.get_export_any_model(session, tenant_id="t", export_id=export_id)
        artifact = export_artifact(session, store, export=export)
    lineage = artifact["lineage"]
    assert lineage == recorded
    assert lineage["source"] == {"model": model_id, "kind": "adapter", "name": "support-bot", "version": "v1",
                                 "version_id": version.id, "manifest_sha256": version.manifest_sha256,
                                 "base_model": {"ref": "tiny-llama", "kind": "builtin"}}
    assert (lineage["export_id"], lineage["job_id"], lineage["tenant"]) == (export_id, job_id, "t")
    assert (lineage["format"], lineage["target"], lineage["deploy"]["fallback"]) == ("adapter", "vllm", "merged")
    assert lineage["checks"] == {"server_rules": "vllm: all passed", "adapter": "<server path>"}
    assert lineage["libraries"] == {"torch": "2.13.0", "peft": "1"} and len(lineage["chat_template_sha256"]) == 64
    assert str(home) not in json.dumps(lineage)
    # Content-addressed: the manifest of the export's files, each a blob of the store, the digest recorded.
    manifest = {"files": artifact["files"]}
    assert [f["path"] for f in artifact["files"]] == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                                     "chat_template.jinja", "serve.json"]
    assert manifest_digest(manifest) == lineage["manifest_sha256"] and lineage["files"] == 4
    assert verify_directory(manifest, job_dir / EXPORT_DIR) == []
    with db.session() as session:
        for entry in [*artifact["files"], {"sha256": next(r["sha256"] for r in export_rows.artifact_files(
                session, export_id=export_id) if r["path"] == LINEAGE_PATH)}]:
            assert store.exists(entry["sha256"]) and version_rows.blob_referenced(session, sha256=entry["sha256"])

    # The CLI, both ways.
    printed = lineage_output(capsys, export_id, "--tenant", "t")
    first, *chain = printed.splitlines()
    assert first.startswith(f"export {export_id} (adapter for vllm, 4 files, sha256:{lineage['manifest_sha256'][:12]})")
    assert f"by job {job_id}, made from support-bot v1 ({model_id})" in first
    assert chain[0].startswith(f"  support-bot v1 (adapter, {model_id}) from job {trained}")
    assert chain[-1].strip() == "base model tiny-llama (builtin)"
    printed = lineage_output(capsys, "support-bot@v1", "--tenant", "t")
    assert printed.splitlines()[-2:] == ["exported as:", "  " + first.split(", made from")[0]]
    with db.session() as session:
        assert [a["export_id"] for a in exports_of_version(session, store, version=version)] == [export_id]

    # Another tenant does not see it; the lineage outlives the version it names.
    assert main(["models", "lineage", export_id, "--tenant", "other"]) != 0
    assert "has no export with this id" in capsys.readouterr().err
    with db.session() as session:
        job_rows.get_job_any_tenant(session, job_id=job_id).status = "succeeded"  # as states.succeed left it
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
    printed = lineage_output(capsys, export_id, "--tenant", "t")
    assert printed.splitlines() == [first]  # still made from support-bot v1; its own chain went with it


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_that_is_not_an_exports_api_export_records_nothing(db, tmp_path):
    home = Path(os.environ["TUNEFORGE_HOME"])
    trained, _ = make_job(db)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=trained)
        assert register_export(session, LocalArtifactStore(tmp_path / "artifacts"), job=job,
                               job_dir=home / "jobs" / trained) is None


def trained_summary(deployment: Deployment | None) -> JobSummary:
    return JobSummary(method="sft", adapter="lora", base_model="tiny-llama", device="cpu", precision="fp32", steps=2,
                      epochs=1.0, train_loss=1.0, train_loss_last_10_mean=1.0, tokens_seen=10, trained_tokens=5,
                      trainable_parameters=8, eval=Evaluation(), output="adapter", train_seconds=1.0, wall_time_s=2.0,
                      world_size=1, strategy="single", ranks=[], deployment=deployment)


def trained_with_deploy(db, store, home: Path, deployment: Deployment | None) -> tuple[str, str]:
    """A training job with deploy: whose recipe wrote its adapter (and, when deploy: succeeded, DIR/export), then
    registered as the worker registers a succeeded job's output; returns (job id, model id)."""
    job_id, _ = make_job(db, deploy={"target": "vllm"})
    job_dir = home / "jobs" / job_id
    write_output(job_dir, b"deployed-weights")
    if deployment is not None and deployment.status == "succeeded":
        write_export(job_dir, home)
    write_summary(job_dir, trained_summary(deployment))
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        model = register_job_output(session, job=job, job_dir=job_dir, home=home, output="adapter", store=store)
        job.status = "succeeded"  # as states.succeed left it, in the same transaction
        return job_id, model.id


def api_app(db, tmp_path: Path):
    """The API on db, its artifact store, and an API key for each of the tenants t and u."""
    from tuneforge.api.app import create_app

    app = create_app(Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False),
                                       artifacts_dir=tmp_path / "artifacts"), db=db)
    keys = {}
    with db.session() as session:
        for tenant in ("t", "u"):
            _, keys[tenant] = tenant_rows.create_api_key(session, tenant_id=tenant)
    return app, app.state.store, keys


def test_deploy_in_a_job_spec_is_recorded_and_the_api_shows_each_exports_lineage(db, tmp_path):
    from fastapi.testclient import TestClient

    home = Path(os.environ["TUNEFORGE_HOME"])
    app, store, keys = api_app(db, tmp_path)
    succeeded = Deployment(status="succeeded", target="vllm", format="adapter", path=EXPORT_DIR, command="vllm serve")
    trained, model_id = trained_with_deploy(db, store, home, succeeded)

    # Recorded as an export of the job's new model, through the path an Exports API export takes.
    with db.session() as session:
        ((deployed, job),) = export_rows.list_exports(session, tenant_id="t", model_id=model_id)
        assert job.id == trained  # the training job made it: its status is the export's
        version = version_rows.version_of_model(session, tenant_id="t", model_id=model_id)
        lineage = export_artifact(session, store, export=deployed)["lineage"]
    assert lineage["origin"] == "deploy" and lineage["job_id"] == trained
    assert (lineage["source"]["name"], lineage["source"]["version"], lineage["source"]["version_id"]) == (
        "support-bot", "v1", version.id)
    assert (lineage["format"], lineage["target"], lineage["files"]) == ("adapter", "vllm", 4)

    # An Exports API export of the same version (succeeded), and one still queued.
    api_job, api_export, api_dir = export_job(db, home, model_id=model_id)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=api_job)
        register_export(session, store, job=job, job_dir=api_dir)
        job.status = "succeeded"
    queued_job, queued_export, _ = export_job(db, home, model_id=model_id)

    client = TestClient(app, headers={"Authorization": f"Bearer {keys['t']}"})
    listed = client.get(f"/v1/models/{model_id}/exports")
    assert listed.status_code == 200, listed.text
    objects = {e["id"]: e for e in listed.json()["data"]}
    assert list(objects) == [deployed.id, api_export, queued_export]
    assert [e["origin"] for e in objects.values()] == ["deploy", "export_job", "export_job"]
    for export in objects.values():  # each names the version it came from
        assert (export["source"]["version_id"], export["source"]["version"]) == (version.id, "v1")
    shown = client.get(f"/v1/models/{model_id}/exports/{deployed.id}").json()
    assert shown["status"] == "succeeded" and shown["lineage"] == lineage and shown["descriptor"]["format"] == "adapter"
    assert objects[api_export]["lineage"]["origin"] == "export_job"
    assert objects[queued_export]["status"] == "queued" and objects[queued_export]["lineage"] is None
    assert str(home) not in listed.text

    # The version's lineage lists its exports, with the digest of each recorded one's files.
    traced = client.get("/v1/registry/models/support-bot/versions/v1/lineage")
    assert traced.status_code == 200, traced.text
    exports = traced.json()["exports"]
    assert [(e["id"], e["origin"], e["status"]) for e in exports] == [
        (deployed.id, "deploy", "succeeded"), (api_export, "export_job", "succeeded"), (queued_export, "export_job", "queued")]
    assert exports[0]["manifest_sha256"] == lineage["manifest_sha256"] and exports[0]["job_id"] == trained
    assert exports[2]["manifest_sha256"] is None and exports[2]["job_id"] == queued_job
    assert traced.json()["chain"][0]["job_id"] == trained and str(home) not in traced.text

    # Its deploy: leaves the training job a fine-tuning job; the export jobs stay out of that list.
    assert client.get(f"/v1/fine_tuning/jobs/{trained}").status_code == 200
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [trained]

    # Another tenant sees neither the exports nor the lineage.
    other = TestClient(app, headers={"Authorization": f"Bearer {keys['u']}"})
    assert other.get(f"/v1/models/{model_id}/exports/{deployed.id}").status_code == 404
    assert other.get("/v1/registry/models/support-bot/versions/v1/lineage").status_code == 404


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failed_or_absent_deploy_records_no_export(db, tmp_path):
    home = Path(os.environ["TUNEFORGE_HOME"])
    store = LocalArtifactStore(tmp_path / "artifacts")
    failed = Deployment(status="failed", target="vllm", format="adapter", error="ValueError: bias: bias is 'all'")
    for deployment in (failed, None):
        _, model_id = trained_with_deploy(db, store, home, deployment)
        with db.session() as session:
            assert export_rows.list_exports(session, tenant_id="t", model_id=model_id) == []


def test_an_export_is_deleted_with_its_files_and_blobs_but_never_while_its_job_may_run(db, tmp_path):
    from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from tuneforge.db.tables import RegistryBlob

    home = Path(os.environ["TUNEFORGE_HOME"])
    app, store, keys = api_app(db, tmp_path)
    succeeded = Deployment(status="succeeded", target="vllm", format="adapter", path=EXPORT_DIR, command="vllm serve")
    trained, model_id = trained_with_deploy(db, store, home, succeeded)
    api_job, api_export, api_dir = export_job(db, home, model_id=model_id)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=api_job)
        register_export(session, store, job=job, job_dir=api_dir)
        job.status = "succeeded"
        ((deployed, _), *_) = export_rows.list_exports(session, tenant_id="t", model_id=model_id)
        deployed_id = deployed.id
    queued_job, queued_export, _ = export_job(db, home, model_id=model_id)

    def holders(export_id: str) -> dict[str, int]:
        """Each file the export owns -> how many registry rows (any owner) hold its bytes: what the collector reads."""
        with db.session() as session:
            return {f["path"]: session.scalar(select(func.count()).where(RegistryBlob.sha256 == f["sha256"]))
                    for f in export_rows.artifact_files(session, export_id=export_id)}

    api_files, deploy_files = holders(api_export), holders(deployed_id)
    assert api_files[LINEAGE_PATH] == 1 and api_files["adapter/adapter_model.safetensors"] == 2  # both exports hold it
    client = TestClient(app, headers={"Authorization": f"Bearer {keys['t']}"})
    other = TestClient(app, headers={"Authorization": f"Bearer {keys['u']}"})

    # Not while its job may still run; another tenant's id answers like a missing one.
    refused = client.delete(f"/v1/models/{model_id}/exports/{queued_export}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "export_in_use", refused.text
    assert queued_job in refused.json()["error"]["message"]
    theirs = other.delete(f"/v1/models/{model_id}/exports/{api_export}")
    missing = other.delete(f"/v1/models/{model_id}/exports/export_missing")
    assert theirs.status_code == missing.status_code == 404

    # The Exports API export: row, files in its job directory and its registry rows gone; the export job stays hidden.
    deleted = client.delete(f"/v1/models/{model_id}/exports/{api_export}")
    assert deleted.status_code == 200 and deleted.json() == {"object": "model.export", "id": api_export, "deleted": True}
    assert not (api_dir / EXPORT_DIR).exists()
    assert holders(api_export) == {}
    assert holders(deployed_id)["adapter/adapter_model.safetensors"] == 1  # the other export still holds those bytes
    assert client.get(f"/v1/models/{model_id}/exports/{api_export}").status_code == 404
    assert [e["id"] for e in client.get(f"/v1/models/{model_id}/exports").json()["data"]] == [deployed_id, queued_export]
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [trained]

    # deploy:'s export: only DIR/export of the training job goes; the job, its model and its version stay.
    assert client.delete(f"/v1/models/{model_id}/exports/{deployed_id}").status_code == 200
    trained_dir = home / "jobs" / trained
    assert not (trained_dir / EXPORT_DIR).exists() and (trained_dir / "adapter").is_dir()
    assert holders(deployed_id) == {} and deploy_files
    assert client.get(f"/v1/fine_tuning/jobs/{trained}").status_code == 200
    assert client.get("/v1/registry/models/support-bot/versions/v1").status_code == 200
    lineage = client.get("/v1/registry/models/support-bot/versions/v1/lineage").json()
    assert [e["id"] for e in lineage["exports"]] == [queued_export]

    # A deleted model's exports outlive it (their lineage does) and can still be deleted by their ids.
    with db.session() as session:  # its export job ended (as a cancel leaves it), so the model is in use no more
        job_rows.get_job_any_tenant(session, job_id=queued_job).status = "cancelled"
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
    assert client.get(f"/v1/models/{model_id}/exports/{queued_export}").status_code == 404
    assert other.delete(f"/v1/models/{model_id}/exports/{queued_export}").status_code == 404
    assert client.delete(f"/v1/models/{model_id}/exports/{queued_export}").status_code == 200
    with db.session() as session:
        assert export_rows.list_exports(session, tenant_id="t", model_id=model_id) == []
