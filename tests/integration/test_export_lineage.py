"""Exports as registry artifacts, against real SQLite and PostgreSQL: a succeeded export's files go into the
content-addressed store (owned by the export, so the collector keeps them), its lineage names the model version
it was made from and survives that version's deletion, and `tuneforge models lineage` shows it both ways (the
export's id -> the version and its chain; the version -> its exports). Another tenant's export id is unknown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_registry_db import db, make_job, register  # noqa: F401 - db is the fixture

from tuneforge.cli import main
from tuneforge.db import exports as export_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.exports import LINEAGE_PATH, export_artifact, exports_of_version, register_export
from tuneforge.registry.models import delete_model_and_version
from tuneforge.registry.versions import manifest_digest, verify_directory
from tuneforge.scheduler import states
from tuneforge.spec import validate_job_spec
from tuneforge.spec.jobdir import ENVIRONMENT_FILE, EXPORT_DIR
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
    return job_id, export_id, job_dir


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
