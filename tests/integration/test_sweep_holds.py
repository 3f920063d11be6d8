"""A running sweep holds what its later trials will name: a fine-tuned model its space names and a registered base
model its base names cannot be deleted while it runs (409 naming the sweep), and can once it ended; a sweep of
another tenant never holds a tenant's own model, but a base model is shared, so any tenant's sweep holds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_base_model_lifecycle import hf_directory
from test_registry_db import db, make_job, register  # noqa: F401 - db is the fixture

from tuneforge.db import models as model_rows
from tuneforge.db import sweeps as sweep_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.models import RegistryError, delete_base_model, delete_model_and_version, register_base_model
from tuneforge.spec.sweep import validate_sweep_spec


def running_sweep(db, *, tenant: str, file_id: str, base_model: str = "tiny-llama", choices: list | None = None) -> str:
    """A sweep row as POST /v1/sweeps leaves it (no trial submitted yet): the driver would name the models later."""
    spec = validate_sweep_spec({
        "sampler": "grid", "base": {"model": {"base_model": base_model}, "dataset": {"path": file_id},
                                    "training": {"max_steps": 2}, "evaluation": {"metrics": ["loss"]}},
        "space": ({"model.base_model": {"type": "choice", "values": choices}} if choices else
                  {"training.learning_rate": {"type": "choice", "values": [1e-4, 1e-3]}}),
        "objectives": [{"metric": "loss"}]})
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=tenant)
        return sweep_rows.create_sweep(session, tenant_id=tenant, name=None, spec=spec.model_dump(mode="json")).id


def end(db, sweep_id: str) -> None:
    with db.session() as session:
        assert sweep_rows.finish_sweep(session, sweep_id=sweep_id, status="cancelled", reason="cancelled by the test")


def test_a_model_a_running_sweeps_space_names_is_held_until_the_sweep_ends(db, tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    job_id, file_id = make_job(db)
    model_id = register(db, store, Path(os.environ["TUNEFORGE_HOME"]), job_id, b"weights")
    sweep_id = running_sweep(db, tenant="t", file_id=file_id, choices=["tiny-llama", model_id])
    with db.session() as session:
        with pytest.raises(RegistryError) as refused:
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
    assert refused.value.status == 409 and refused.value.code == "model_in_use"
    assert f"sweep {sweep_id} (running) uses it" in refused.value.message

    end(db, sweep_id)
    running_sweep(db, tenant="t", file_id=file_id)  # a running sweep that does not name it holds nothing
    with db.session() as session:
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
        assert model_rows.get_model(session, tenant_id="t", model_id=model_id) is None


def test_a_sweep_holds_a_checkpoint_of_a_model_it_names(db, tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    job_id, file_id = make_job(db)
    model_id = register(db, store, Path(os.environ["TUNEFORGE_HOME"]), job_id, b"weights")
    sweep_id = running_sweep(db, tenant="t", file_id=file_id, base_model=f"{model_id}:ckpt-step-4")
    with db.session() as session:
        with pytest.raises(RegistryError, match=f"sweep {sweep_id} \\(running\\) uses it"):
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))


def test_a_registered_base_model_is_held_by_any_tenants_running_sweep(db, tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    with db.session() as session:
        register_base_model(session, store, name="my-base", directory=hf_directory(tmp_path / "a", weights=b"mine"))
    _, file_id = make_job(db, tenant="u")
    sweep_id = running_sweep(db, tenant="u", file_id=file_id, base_model="my-base")
    with db.session() as session:
        with pytest.raises(RegistryError) as refused:
            delete_base_model(session, name="my-base")
    assert refused.value.status == 409 and f"sweep {sweep_id} (running) of tenant u uses it" in refused.value.message
    end(db, sweep_id)
    with db.session() as session:
        delete_base_model(session, name="my-base")
