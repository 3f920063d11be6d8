"""A registered model version made on one machine, trained from on another, through the object store (moto's
S3-compatible server): the worker stages the version's files (and those of the versions down its lineage) from
the objects their jobs published, checked against the manifest, into its own artifact folder, and materializes
them there; a file the store lacks, or whose bytes are not the registered ones, fails the staging by name. A base
model the operator registers (`tuneforge models register --base`) with the object store configured goes into it
too, and a worker elsewhere stages it, and an adapter trained on it, from there."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from test_registry_db import db, make_job, register  # noqa: F401 - db is the fixture

from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.models import materialize_source, model_source
from tuneforge.registry.storage.backends import S3Store
from tuneforge.registry.storage.jobs import StoreUnavailable, publish_outputs, stage_registered_model
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.registry.storage.tenant_store import TenantStore
from tuneforge.registry.versions import verify_directory
from tuneforge.spec.jobdir import BASE_OF_ADAPTER


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the store's rows are tested on both elsewhere
def test_a_version_made_elsewhere_is_staged_from_the_object_store(db, s3_server, tmp_path):
    home = Path(os.environ["TUNEFORGE_HOME"])
    store = TenantStore(db, S3Store(s3_server.new_bucket(), "tf", endpoint_url=s3_server.endpoint_url),
                        keys=FolderKeyProvider(tmp_path / "keys"), scratch=LocalArtifactStore(tmp_path / "scratch"))
    made_on = LocalArtifactStore(tmp_path / "machine-1")
    first, _ = make_job(db)
    v1 = register(db, made_on, home, first, b"weights-one")
    second, _ = make_job(db, base=v1)  # v2 continued v1: its lineage names v1
    v2 = register(db, made_on, home, second, b"weights-two")
    for job_id in (first, second):  # as the worker that ran each job publishes its outputs
        publish_outputs(store, tenant_id="t", job_id=job_id, job_dir=home / "jobs" / job_id)
    with db.session() as session:
        source = model_source(session, tenant_id="t", base_model=v2, home=home)
    assert source.job_id == second and source.base.job_id == first and source.base.base.as_is == "tiny-llama"

    elsewhere = LocalArtifactStore(tmp_path / "machine-2")
    with pytest.raises(FileNotFoundError):  # what a worker without the store's copy ran into
        materialize_source(elsewhere, source, tmp_path / "machine-2-registry")
    # v2's three files, then v1's weights (its config and tokenizer are the same bytes as v2's: one blob each).
    assert stage_registered_model(store, elsewhere, tenant_id="t", source=source) == 4
    assert stage_registered_model(store, elsewhere, tenant_id="t", source=source) == 0  # nothing left to fetch
    adapter = Path(materialize_source(elsewhere, source, tmp_path / "machine-2-registry"))
    assert verify_directory(source.manifest, adapter) == []
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"weights-two"
    assert not list((tmp_path / "machine-2").glob("staging/*/blob"))  # the fetched copies became blobs

    # A version whose job published nothing, and one whose registered digest the stored bytes do not have.
    unpublished, _ = make_job(db)
    v3 = register(db, made_on, home, unpublished, b"weights-three")
    with db.session() as session:
        lonely = model_source(session, tenant_id="t", base_model=v3, home=home)
    with pytest.raises(StoreUnavailable, match=r"made by job ftjob-[0-9a-f]+: adapter/adapter_config.json is not in the object store"):
        stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-3"), tenant_id="t", source=lonely)
    forged = dataclasses.replace(source, base=None, manifest={"files": [
        {**entry, "sha256": "0" * 64} if entry["path"] == "adapter_model.safetensors" else entry
        for entry in source.manifest["files"]]})
    with pytest.raises(StoreUnavailable, match="is not the registered file"):
        stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-4"), tenant_id="t", source=forged)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_registered_base_model_goes_to_the_object_store_and_is_staged_elsewhere(db, s3_server, tmp_path, monkeypatch,
                                                                                  capsys):
    from tuneforge.cli import main
    from tuneforge.registry.storage.jobs import BASE_MODELS_TENANT

    home = Path(os.environ["TUNEFORGE_HOME"])
    bucket = s3_server.new_bucket()
    for name, value in {"TUNEFORGE_DATABASE_URL": db.engine.url.render_as_string(hide_password=False),
                        "TUNEFORGE_ARTIFACTS_DIR": str(tmp_path / "machine-1"), "TUNEFORGE_STORE_URL": f"s3://{bucket}/tf",
                        "TUNEFORGE_S3_ENDPOINT_URL": s3_server.endpoint_url,
                        "TUNEFORGE_KEYS_DIR": str(tmp_path / "keys")}.items():
        monkeypatch.setenv(name, value)
    hf = tmp_path / "hf"
    (hf / "sub").mkdir(parents=True)
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"operator base weights")
    (hf / "sub" / "tokenizer.json").write_text("{}")
    assert main(["models", "register", "--base", "my-base", str(hf)]) == 0, capsys.readouterr().err
    assert f"published to s3://{bucket}/tf" in capsys.readouterr().err
    store = TenantStore(db, S3Store(bucket, "tf", endpoint_url=s3_server.endpoint_url),
                        keys=FolderKeyProvider(tmp_path / "keys"), scratch=LocalArtifactStore(tmp_path / "scratch"))
    sealed = [store.backend.open(key).read() for key in store.backend.keys(BASE_MODELS_TENANT + "/")]
    assert len(sealed) == 3 and not any(b"operator base weights" in data for data in sealed)  # sealed at rest

    # A version trained on it by a worker on machine 1, then a worker on machine 2 (its own empty artifact folder).
    made_on = LocalArtifactStore(tmp_path / "machine-1")
    job, _ = make_job(db, base="my-base")
    version = register(db, made_on, home, job, b"adapter-on-my-base")
    publish_outputs(store, tenant_id="t", job_id=job, job_dir=home / "jobs" / job)
    with db.session() as session:
        source = model_source(session, tenant_id="t", base_model=version, home=home)
    assert source.base.registered_base == "my-base"
    elsewhere = LocalArtifactStore(tmp_path / "machine-2")
    assert stage_registered_model(store, elsewhere, tenant_id="t", source=source) == 3 + 3  # adapter's, then base's
    adapter = Path(materialize_source(elsewhere, source, tmp_path / "machine-2-registry"))
    base = Path(json.loads((adapter / BASE_OF_ADAPTER).read_text())["base_model"])
    assert (base / "model.safetensors").read_bytes() == b"operator base weights"
    assert verify_directory(source.base.manifest, base) == []

    # Registered before the store was configured: a worker elsewhere says so by name, and registering the same
    # files again publishes them; other files under the name are refused.
    monkeypatch.delenv("TUNEFORGE_STORE_URL")
    (hf / "model.safetensors").write_bytes(b"older base weights")
    assert main(["models", "register", "--base", "old-base", str(hf)]) == 0
    with db.session() as session:
        old = model_source(session, tenant_id="t", base_model="old-base", home=home)
    with pytest.raises(StoreUnavailable, match="registered base model old-base: model/config.json is not in the "
                                               "object store .*register --base"):
        stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-3"), tenant_id="t", source=old)
    monkeypatch.setenv("TUNEFORGE_STORE_URL", f"s3://{bucket}/tf")
    assert main(["models", "register", "--base", "old-base", str(hf)]) == 0
    assert stage_registered_model(store, LocalArtifactStore(tmp_path / "machine-3"), tenant_id="t", source=old) == 3
    (hf / "model.safetensors").write_bytes(b"changed weights")
    capsys.readouterr()
    assert main(["models", "register", "--base", "old-base", str(hf)]) != 0
    assert "registered already, with other files" in capsys.readouterr().err
