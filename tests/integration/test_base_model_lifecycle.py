"""A registered base model is a registry citizen to the end: an admin deletes it (CLI or API) only once no job
that may still run names it and no live adapter was trained on it, the refusal naming each; its blobs, and its
objects in the object store (moto's S3-compatible server), are collected once nothing else holds them (another
base model sharing a file keeps that one; a registration still publishing keeps its own); and the key sealing the
base models' objects is rotated with `tuneforge storage rotate-key --base-models`."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select, update
from test_registry_db import db, make_job, register  # noqa: F401 - db is the fixture

from tuneforge.db import keys as key_rows
from tuneforge.db import models as model_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tables import ObjectLink, StoredObject
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.models import (
    RegistryError,
    delete_model_and_version,
    model_source,
    register_base_model,
    resolve_base_reference,
)
from tuneforge.registry.storage.jobs import (
    BASE_MODELS_TENANT,
    base_model_owner,
    publish_base_model,
    stage_registered_model,
)
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.registry.versions import store_directory
from tuneforge.scheduler import states
from tuneforge.scheduler.blobs import BlobCollector
from tuneforge.settings import Settings


def hf_directory(path: Path, *, weights: bytes, tokenizer: str = "{}") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text(tokenizer)
    return path


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def test_a_registered_base_model_is_deleted_by_the_rules_and_its_blobs_collected(db, tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app

    home = Path(os.environ["TUNEFORGE_HOME"])
    app = create_app(Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False),
                                       artifacts_dir=tmp_path / "artifacts"), db=db)
    store = app.state.store
    with db.session() as session:  # two base models that share their config and tokenizer
        register_base_model(session, store, name="my-base", directory=hf_directory(tmp_path / "a", weights=b"mine"))
        register_base_model(session, store, name="twin", directory=hf_directory(tmp_path / "b", weights=b"twin's"))
        _, tenant_key = tenant_rows.create_api_key(session, tenant_id="t")
        _, admin_key = tenant_rows.create_api_key(session, tenant_id="ops", admin=True)
    tenant = TestClient(app, headers={"Authorization": f"Bearer {tenant_key}"})
    admin = TestClient(app, headers={"Authorization": f"Bearer {admin_key}"})

    def admin_delete(expected: int) -> dict:
        answer = admin.delete("/v1/models/my-base")
        assert answer.status_code == expected, answer.text
        return answer.json()

    job, _ = make_job(db, base="my-base")  # queued: it may still run
    refused = tenant.delete("/v1/models/my-base")
    assert refused.status_code == 403 and "only an admin key" in refused.json()["error"]["message"]
    assert admin.delete("/v1/models/tiny-llama").status_code == 403  # built-in: ships with tuneforge
    error = admin_delete(409)["error"]
    assert error["code"] == "model_in_use" and f"job {job} (queued) of tenant t uses it" in error["message"]

    adapter = register(db, store, home, job, b"adapter on my-base")  # the job's adapter, a delta on my-base
    with db.session() as session:
        states.cancel(session, job_id=job)
    assert "support-bot v1 of tenant t is an adapter trained on it" in admin_delete(409)["error"]["message"]
    with db.session() as session:
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=adapter))
    assert admin_delete(200) == {"object": "model", "id": "my-base", "deleted": True}
    assert "my-base" not in {m["id"] for m in tenant.get("/v1/models").json()["data"]}
    admin_delete(404)
    with db.session() as session, pytest.raises(RegistryError, match="is not available on this server"):
        resolve_base_reference(session, tenant_id="t", ref="my-base")

    # The collector removes the weights only my-base held; the twin's files, the shared ones too, stay.
    blobs = tmp_path / "artifacts" / "sha256"
    for blob in blobs.glob("*/*"):
        os.utime(blob, (1, 1))
    BlobCollector(db, dataclasses.replace(Settings.from_env(), blob_grace_seconds=0.0), store).run_once()
    left = {p.name for p in blobs.glob("*/*")}
    assert sha(b"mine") not in left
    assert {sha(b"twin's"), sha('{"model_type": "llama"}'), sha("{}")} <= left

    # The name is free again: registered anew with other files.
    with db.session() as session:
        register_base_model(session, store, name="my-base", directory=hf_directory(tmp_path / "c", weights=b"new"))
        assert resolve_base_reference(session, tenant_id="t", ref="my-base") == "my-base"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the collector's queries run on both above
def test_base_models_objects_are_collected_after_deletion_and_their_key_rotates(db, s3_server, tmp_path, monkeypatch,
                                                                                capsys):
    from tuneforge.cli import main
    from tuneforge.registry.storage.tenant_store import open_tenant_store

    home = Path(os.environ["TUNEFORGE_HOME"])
    for name, value in {"TUNEFORGE_DATABASE_URL": db.engine.url.render_as_string(hide_password=False),
                        "TUNEFORGE_ARTIFACTS_DIR": str(tmp_path / "machine-1"),
                        "TUNEFORGE_STORE_URL": f"s3://{s3_server.new_bucket()}/tf",
                        "TUNEFORGE_S3_ENDPOINT_URL": s3_server.endpoint_url,
                        "TUNEFORGE_KEYS_DIR": str(tmp_path / "keys")}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    mine = hf_directory(tmp_path / "mine", weights=b"operator weights", tokenizer='{"a": 1}')
    kept = hf_directory(tmp_path / "kept", weights=b"kept weights", tokenizer='{"b": 2}')  # shares config.json
    for name, directory in (("my-base", mine), ("kept-base", kept)):
        assert main(["models", "register", "--base", name, str(directory)]) == 0, capsys.readouterr().err
    store = open_tenant_store(db, settings)
    with db.session() as session:
        sources = {name: model_source(session, tenant_id="t", base_model=name, home=home)
                   for name in ("my-base", "kept-base")}
        assert key_rows.live_key_versions(session, tenant_id=BASE_MODELS_TENANT) == [1]

    # Rotation: every base model object's data key re-wrapped under version 2, version 1 destroyed; still readable.
    capsys.readouterr()
    assert main(["storage", "rotate-key", "--base-models"]) == 0, capsys.readouterr().err
    assert "registered base models: data keys re-wrapped under key version 2" in capsys.readouterr().err
    with db.session() as session:
        assert key_rows.live_key_versions(session, tenant_id=BASE_MODELS_TENANT) == [2]
        assert set(session.scalars(select(StoredObject.key_version).where(
            StoredObject.tenant_id == BASE_MODELS_TENANT))) == {2}
    assert FolderKeyProvider(tmp_path / "keys").versions(BASE_MODELS_TENANT) == [2]
    assert stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-2"), tenant_id="t",
                                  source=sources["my-base"]) == 3
    assert main(["storage", "rotate-key", "--base-models", "--tenant", "t"]) != 0
    assert "not both" in capsys.readouterr().err
    assert main(["storage", "shred", "--base-models", "--yes"]) != 0
    assert "for rotate-key only" in capsys.readouterr().err

    # Deletion from the CLI: refused while a queued job trains from it, then done.
    job, _ = make_job(db, base="my-base")
    assert main(["models", "delete", "--base", "my-base"]) != 0
    assert f"base model my-base cannot be deleted: job {job} (queued) of tenant t uses it" in capsys.readouterr().err
    with db.session() as session:
        states.cancel(session, job_id=job)
    assert main(["models", "delete", "--base", "my-base"]) == 0, capsys.readouterr().err

    # A registration publishing right now (its files in the store, its row not yet written) has young links.
    pending = hf_directory(tmp_path / "pending", weights=b"pending weights", tokenizer='{"c": 3}')
    manifest, pending_digest = store_directory(LocalArtifactStore(tmp_path / "machine-1"), pending)
    publish_base_model(store, directory=pending, manifest=manifest, manifest_sha256=pending_digest)
    # my-base's links and every object past the grace period; the pending registration's links are not.
    mine_owner = base_model_owner(sources["my-base"].manifest_sha256)
    with db.session() as session:
        session.execute(update(ObjectLink).where(ObjectLink.owner == mine_owner).values(created_at=1))
        session.execute(update(StoredObject).where(StoredObject.tenant_id == BASE_MODELS_TENANT).values(created_at=1))
    counts = BlobCollector(db, dataclasses.replace(settings, blob_grace_seconds=3600.0),
                           LocalArtifactStore(tmp_path / "machine-1")).run_once()
    assert (counts["store links dropped"], counts["store objects removed"]) == (3, 2)  # config.json is kept-base's too
    assert store.linked(tenant_id=BASE_MODELS_TENANT, owner=mine_owner) == {}
    assert len(store.linked(tenant_id=BASE_MODELS_TENANT, owner=base_model_owner(pending_digest))) == 3
    assert len(list(store.backend.keys(BASE_MODELS_TENANT + "/"))) == 3 + 2  # kept-base's three, pending's other two
    assert stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-3"), tenant_id="t",
                                  source=sources["kept-base"]) == 3
