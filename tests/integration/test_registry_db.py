"""The model registry against real SQLite and PostgreSQL: a job's output becomes v1, v2... of its name with
a manifest and lineage; identical files are stored once; aliases move; a version an alias, a queued job or
an adapter trained on it uses cannot be deleted; deleted versions' blobs are collected and live ones are
not; checkpoints past the retention policy go; continuing an adapter materializes it with its base."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from tuneforge.db import files as file_rows
from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.models import (
    RegistryError,
    delete_model_and_version,
    find_reference,
    lineage_chain,
    materialize_source,
    model_source,
    register_job_output,
    resolve_base_reference,
)
from tuneforge.registry.versions import verify_directory
from tuneforge.scheduler import states
from tuneforge.scheduler.blobs import BlobCollector
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec
from tuneforge.spec.jobdir import BASE_OF_ADAPTER, ENVIRONMENT_FILE

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    upgrade(database.engine)
    yield database
    database.dispose()


def make_job(db: Database, *, base: str = "tiny-llama", suffix: str | None = "support-bot", tenant: str = "t",
             keep_last: int = 2, deploy: dict | None = None) -> tuple[str, str]:
    """A queued job on a real file row (with deploy: when given); returns (job id, file id)."""
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=tenant)
        file = file_rows.create_file(session, tenant_id=tenant, filename="train.jsonl", purpose="fine-tune", size=10,
                                     sha256="ab" * 32, report={}, status="processed", status_details=None)
        spec = validate_job_spec({"name": suffix, "model": {"base_model": base}, "dataset": {"path": file.id},
                                  "training": {"seed": 7}, "checkpoint": {"keep_last": keep_last},
                                  **({"deploy": deploy} if deploy else {})})
        job = job_rows.create_job(session, tenant_id=tenant, spec=spec, model=base, training_file=file.id,
                                  validation_file=None, suffix=suffix, metadata=None)
        assert states.admit(session, job_id=job.id)
        return job.id, file.id


def write_output(job_dir: Path, weights: bytes, *, steps=(2, 4, 6)) -> None:
    adapter = job_dir / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (job_dir / ENVIRONMENT_FILE).write_text(json.dumps({"torch": "2.13.0", "transformers": "5.0", "peft": "1"}))
    (job_dir / "resolved_spec.json").write_text(json.dumps({  # with the local paths the worker put in
        "training": {"seed": 7, "learning_rate": 2e-4}, "dataset": {"path": "/srv/artifacts/sha256/ab/abab"},
        "model": {"base_model": "/srv/registry/0123-on-4567"}}))
    for step in steps:
        (job_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)


def register(db, store, home, job_id: str, weights: bytes, steps=(2, 4, 6)):
    job_dir = home / "jobs" / job_id
    write_output(job_dir, weights, steps=steps)
    with db.session() as session:
        for step in steps:
            event_rows.record_checkpoint(session, job_id=job_id, step=step, path=f"checkpoints/step-{step}", size=1,
                                         metrics={}, created_at=None)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        model = register_job_output(session, job=job, job_dir=job_dir, home=home, output="adapter", store=store)
        return model.id


def test_versions_lineage_dedupe_aliases_deletion_rules_and_collection(db, tmp_path):
    home = Path(os.environ["TUNEFORGE_HOME"])
    store = LocalArtifactStore(tmp_path / "artifacts")
    first, file_id = make_job(db)
    second, _ = make_job(db)
    v1_model = register(db, store, home, first, b"weights-one")
    v2_model = register(db, store, home, second, b"weights-two")

    with db.session() as session:
        v1, v2 = version_rows.list_versions(session, tenant_id="t", name="support-bot")
        assert (v1.version, v2.version, v1.model_id, v2.model_id) == (1, 2, v1_model, v2_model)
        assert [e["path"] for e in v1.manifest["files"]] == ["adapter_config.json", "adapter_model.safetensors",
                                                             "tokenizer_config.json"]
        assert v1.manifest_sha256 != v2.manifest_sha256
        lineage = v1.lineage
        assert lineage["job_id"] == first and lineage["tenant"] == "t" and lineage["seed"] == 7
        assert lineage["base_model"] == {"ref": "tiny-llama", "kind": "builtin"}
        assert lineage["datasets"] == [{"role": "training", "file_id": file_id, "filename": "train.jsonl",
                                        "sha256": "ab" * 32, "bytes": 10}]
        assert lineage["libraries"]["torch"] == "2.13.0" and lineage["resolved_spec"]["training"]["seed"] == 7
        # Users see the ids the job was submitted with, never a server path.
        assert lineage["resolved_spec"]["dataset"]["path"] == file_id
        assert lineage["resolved_spec"]["model"]["base_model"] == "tiny-llama"
        assert len(lineage["chat_template_sha256"]) == 64
        assert version_rows.tags(session, version_id=v1.id) == {}
        # Retention after success: the newest keep_last=2 checkpoints stay, in the db and on disk.
        assert sorted(c.step for c in event_rows.list_checkpoints(session, job_id=first, limit=10)[0]) == [4, 6]
    assert not (home / "jobs" / first / "checkpoints" / "step-2").exists()
    assert (home / "jobs" / first / "checkpoints" / "step-6").is_dir()

    # Dedupe: the files both versions share are one blob each; only the weights differ.
    blobs = sorted(p.name for p in (tmp_path / "artifacts" / "sha256").glob("*/*"))
    assert len(blobs) == 4

    # Aliases move; references resolve to the pinned ft: id.
    with db.session() as session:
        version_rows.set_alias(session, version=v1, alias="production")
        assert resolve_base_reference(session, tenant_id="t", ref="support-bot:production") == v1_model
        version_rows.set_alias(session, version=v2, alias="production")
        assert resolve_base_reference(session, tenant_id="t", ref="support-bot:production") == v2_model
        assert resolve_base_reference(session, tenant_id="t", ref="support-bot@v1") == v1_model
        assert find_reference(session, tenant_id="t", ref="support-bot").model_id == v2_model
        with pytest.raises(RegistryError, match="no version or alias 'staging'"):
            resolve_base_reference(session, tenant_id="t", ref="support-bot:staging")
        with pytest.raises(RegistryError):  # another tenant's reference is a missing one
            resolve_base_reference(session, tenant_id="other", ref="support-bot@v1")

    # A job continuing v1 (queued) blocks v1's deletion; the alias blocks v2's.
    third, _ = make_job(db, base=v1_model, suffix="support-bot")
    with db.session() as session:
        with pytest.raises(RegistryError, match=f"job {third} \\(queued\\) uses it") as caught:
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=v1_model))
        assert caught.value.status == 409
        with pytest.raises(RegistryError, match="alias 'production' points at it"):
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=v2_model))

    # v3, an adapter trained on v1: its lineage chains to v1, and then v1 is held by it.
    v3_model = register(db, store, home, third, b"weights-three", steps=())
    with db.session() as session:
        v3 = version_rows.version_of_model(session, tenant_id="t", model_id=v3_model)
        assert v3.lineage["base_model"]["kind"] == "version" and v3.lineage["base_model"]["version"] == 1
        chain = lineage_chain(session, version=v3)
        assert [step.get("version") for step in chain] == ["v3", "v1", None]
        assert chain[-1]["base_model"] == {"ref": "tiny-llama", "kind": "builtin"}
        source = model_source(session, tenant_id="t", base_model=v3_model, home=home)
    # Continuing v3: v3's files written out, beside them the base it applies to (v1's files, on tiny-llama).
    directory = Path(materialize_source(store, source, home / "registry"))
    assert verify_directory(v3.manifest, directory) == []
    v1_directory = Path(json.loads((directory / BASE_OF_ADAPTER).read_text())["base_model"])
    assert (v1_directory / "adapter_model.safetensors").read_bytes() == b"weights-one"
    assert json.loads((v1_directory / BASE_OF_ADAPTER).read_text()) == {"base_model": "tiny-llama"}
    assert materialize_source(store, source, home / "registry") == str(directory)  # written once

    with db.session() as session:
        states.cancel(session, job_id=third)
        with pytest.raises(RegistryError, match="support-bot v3 is an adapter trained on it"):
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=v1_model))
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=v3_model))
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=v1_model))
        assert [v.version for v in version_rows.list_versions(session, tenant_id="t", name="support-bot")] == [2]
        assert [c.step for c in event_rows.list_checkpoints(session, job_id=first, limit=10)[0]] == []

    # The collector removes the blobs only the deleted versions held, and keeps v2's (and the shared ones).
    settings = dataclasses.replace(Settings.from_env(), blob_grace_seconds=0.0)
    for blob in (tmp_path / "artifacts" / "sha256").glob("*/*"):
        os.utime(blob, (1, 1))
    BlobCollector(db, settings, store).run_once()
    left = sorted(p.name for p in (tmp_path / "artifacts" / "sha256").glob("*/*"))
    with db.session() as session:
        kept = {e["sha256"] for e in version_rows.list_versions(session, tenant_id="t", name="support-bot")[0].manifest["files"]}
    assert set(left) == kept


def test_a_registered_base_model_is_stored_once_resolved_by_name_and_materialized(db, tmp_path):
    from tuneforge.registry.models import register_base_model

    home = Path(os.environ["TUNEFORGE_HOME"])
    store = LocalArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "model.safetensors").write_bytes(b"base weights")
    with db.session() as session:
        register_base_model(session, store, name="my-base", directory=source)
        with pytest.raises(RegistryError, match="registered already"):
            register_base_model(session, store, name="my-base", directory=source)
        with pytest.raises(RegistryError, match="not a built-in model's"):
            register_base_model(session, store, name="tiny-llama", directory=source)
        assert resolve_base_reference(session, tenant_id="anyone", ref="my-base") == "my-base"
        with pytest.raises(RegistryError, match="is not available on this server; expected one of smollm2-135m"):
            resolve_base_reference(session, tenant_id="anyone", ref="no-such-base")
        directory = Path(materialize_source(store, model_source(session, tenant_id="anyone", base_model="my-base",
                                                                home=home), home / "registry"))
        assert version_rows.blob_referenced(session, sha256=hashlib.sha256(b"base weights").hexdigest())
    assert (directory / "model.safetensors").read_bytes() == b"base weights"
    assert (directory / "config.json").read_text() == '{"model_type": "llama"}'
