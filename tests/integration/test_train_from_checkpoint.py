"""Training from a kept checkpoint (ft:...:ckpt-step-N, as OpenAI's API accepts one as a job's model): the jobs
router pins it, a pruned step or another tenant's answers like a missing model; the worker's materialization
assembles the version's files with the checkpoint's weights (decrypted from a job directory sealed at rest, into
the job's own folder), which the recipe runtime merges into the base like any adapter, so the merged model is
base + the checkpoint's adapter, not the final one; the lineage names the checkpoint; and the model cannot be
deleted while a queued job or an adapter version trained on its checkpoint needs it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import chat, random_lora_adapter, write_jsonl
from test_registry_db import db, make_job  # noqa: F401 - db is the fixture

from tuneforge.db import files as file_rows
from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.checkpoints import CheckpointUnavailable
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.registry.models import (
    RegistryError,
    delete_model_and_version,
    lineage_chain,
    materialize_source,
    model_source,
    register_job_output,
    resolve_base_reference,
)
from tuneforge.registry.storage.job_files import seal_job_dir
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.settings import Settings
from tuneforge.spec.jobdir import BASE_OF_ADAPTER

torch = pytest.importorskip("torch")


class OneProcess:
    is_main = True

    def barrier(self) -> None:
        pass


def trained(db, store, home: Path, job_id: str, *, base_dir: Path, steps: dict[int, int], final_seed: int) -> str:
    """The job's final adapter (final_seed) and a checkpoint per step (its seed), registered as the job's version."""
    job_dir = home / "jobs" / job_id
    random_lora_adapter(base_dir, job_dir / "adapter", seed=final_seed)
    for step, seed in steps.items():
        folder = job_dir / "checkpoints" / f"step-{step:06d}"
        random_lora_adapter(base_dir, folder, seed=seed)  # what save_trainable keeps: the weights, and the training state
        (folder / "adapter_config.json").unlink()
        (folder / "README.md").unlink(missing_ok=True)
        (folder / "optimizer.pt").write_bytes(b"optimizer state")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    with db.session() as session:
        for step in steps:
            event_rows.record_checkpoint(session, job_id=job_id, step=step, path=f"checkpoints/step-{step:06d}",
                                         size=1, metrics={}, created_at=None)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        model = register_job_output(session, job=job, job_dir=job_dir, home=home, output="adapter", store=store)
        job.status = "succeeded"  # as states.succeed left it
        return model.id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the registry's queries run on both elsewhere
def test_a_job_trains_from_a_kept_checkpoint_of_a_model(db, tmp_path):
    from fastapi.testclient import TestClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.api.app import create_app
    from tuneforge.engine.base_models import ensure_builtin_model
    from tuneforge.engine.runtime.job import continue_from_adapter
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import MERGED_BASE_DIR

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    home = Path(os.environ["TUNEFORGE_HOME"])
    keys = FolderKeyProvider(tmp_path / "keys")
    store = LocalArtifactStore(tmp_path / "artifacts", keys=keys)
    base_dir = ensure_builtin_model("tiny-llama")
    first, file_id = make_job(db, keep_last=1)
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(12)])
    with db.session() as session:  # a validated training file, so the jobs router admits a job on it
        file_rows.get_file(session, tenant_id="t", file_id=file_id).report = inspect_dataset(
            data, display_name="train.jsonl").model_dump(mode="json")
    # keep_last 1: step 4 is kept, step 2 pruned by the retention policy when the version is registered.
    model_id = trained(db, store, home, first, base_dir=base_dir, steps={2: 2, 4: 3}, final_seed=1)
    checkpoint_id = f"{model_id}:ckpt-step-4"

    app = create_app(Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False),
                                       artifacts_dir=tmp_path / "artifacts"), db=db)
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="t")
    client = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    created = client.post("/v1/fine_tuning/jobs", json={"model": checkpoint_id, "training_file": file_id,
                                                         "suffix": "support-bot"})
    assert created.status_code == 200, created.text
    assert created.json()["model"] == checkpoint_id
    refused = client.post("/v1/fine_tuning/jobs", json={"model": f"{model_id}:ckpt-step-2", "training_file": file_id})
    assert refused.status_code == 400 and "has no kept checkpoint at step 2" in refused.json()["error"]["message"]
    queued = created.json()["id"]
    with db.session() as session:
        with pytest.raises(RegistryError, match="no model with id"):  # another tenant's checkpoint: as a missing one
            resolve_base_reference(session, tenant_id="u", ref=checkpoint_id)
        assert job_rows.get_job_any_tenant(session, job_id=queued).spec["model"]["base_model"] == checkpoint_id
        with pytest.raises(RegistryError, match=f"job {queued} \\([a-z_]+\\) uses it"):
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))

    # The worker's materialization: the job directory is sealed at rest, so the weights are decrypted into the
    # job's own folder; the assembled adapter is the version's config with the checkpoint's weights.
    checkpoint = home / "jobs" / first / "checkpoints" / "step-000004"
    weights = (checkpoint / "adapter_model.safetensors").read_bytes()
    seal_job_dir(db, keys, tenant_id="t", job_id=first, job_dir=home / "jobs" / first)
    assert not (checkpoint / "adapter_model.safetensors").exists()
    with db.session() as session:
        source = model_source(session, tenant_id="t", base_model=checkpoint_id, home=home)
    private = tmp_path / "job-inputs" / "models"
    assembled = Path(materialize_source(store, source, home / "registry", db=db, private_root=private))
    assert assembled.is_relative_to(private) and not list(private.glob(".staging-*"))
    assert (assembled / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((assembled / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((assembled / BASE_OF_ADAPTER).read_text()) == {"base_model": "tiny-llama"}
    assert not (assembled / "optimizer.pt").exists() and not (assembled / "trainer_state.json").exists()
    elsewhere = dataclasses.replace(source, checkpoint=dataclasses.replace(source.checkpoint, job_dir=tmp_path / "x"))
    with pytest.raises(CheckpointUnavailable, match="checkpoint step 4 of job .* is not on this worker"):
        materialize_source(store, elsewhere, home / "registry", db=db, private_root=tmp_path / "other")

    # The recipe runtime merges it into tiny-llama: the checkpoint's adapter, not the final one.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = validate_job_spec({"model": {"base_model": str(assembled)}, "dataset": {"path": "data.jsonl"}})
    merged_dir = continue_from_adapter(spec, job_dir, OneProcess()).model.base_model
    assert merged_dir == str(job_dir / MERGED_BASE_DIR)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(tokens).logits

    def on_base(adapter: Path):
        return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                                adapter))

    got = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    scratch = tmp_path / "checkpoint-adapter"
    random_lora_adapter(base_dir, scratch, seed=3)  # the checkpoint's adapter, as a PEFT folder of its own
    assert torch.allclose(got, on_base(scratch), atol=1e-4, rtol=1e-4)
    shutil.rmtree(scratch)
    random_lora_adapter(base_dir, scratch, seed=1)
    assert (got - on_base(scratch)).abs().max() > 1e-2  # the final adapter answers otherwise

    # The job that trained from the checkpoint registers an adapter on it: its lineage names the checkpoint, the
    # chain goes through the version it came from, and that model cannot go while the adapter lives.
    second = trained(db, store, home, queued, base_dir=base_dir, steps={}, final_seed=5)
    with db.session() as session:
        version = version_rows.version_of_model(session, tenant_id="t", model_id=second)
        assert version.lineage["base_model"] == {"ref": checkpoint_id, "kind": "checkpoint", "model": model_id, "step": 4,
                                                 "name": "support-bot", "version": 1,
                                                 "manifest_sha256": version_rows.version_of_model(
                                                     session, tenant_id="t", model_id=model_id).manifest_sha256}
        assert [step.get("version") for step in lineage_chain(session, version=version)] == ["v2", "v1", None]
        with pytest.raises(RegistryError, match="support-bot v2 is an adapter trained on it"):
            delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
        continued = model_source(session, tenant_id="t", base_model=second, home=home)
    assert continued.base.checkpoint.step == 4
    on_checkpoint = Path(materialize_source(store, continued, home / "registry", db=db, private_root=private))
    assert json.loads((on_checkpoint / BASE_OF_ADAPTER).read_text()) == {"base_model": str(assembled)}
