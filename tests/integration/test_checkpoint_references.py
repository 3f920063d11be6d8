"""A kept checkpoint (ft:...:ckpt-step-N) named where a job names other models: a PPO job's reward model and a
judge through the jobs router, a sweep's base model through /v1/sweeps and the sweep driver; each is pinned as a
job's base model is (another tenant's or a pruned step answers model_not_found), the worker assembles it for the
recipe (decrypted into the job's own inputs), the model cannot be deleted while a queued job uses it, and a PPO
job trains with a reward job's checkpoint end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import chat, write_jsonl
from test_registry_db import db, make_job  # noqa: F401 - db is the fixture
from test_train_from_checkpoint import trained

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.db import sweeps as sweep_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.registry.models import delete_model_and_version
from tuneforge.registry.storage.job_files import seal_job_dir
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.scheduler.sweeps import SweepDriver
from tuneforge.settings import Settings
from tuneforge.spec.sweep import validate_sweep_spec

pytest.importorskip("torch")
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the queries run on both elsewhere

JUDGE_INPUT = [{"role": "user", "content": "Rate this answer from 0 to 1: {{sample.output_text}}"}]


@pytest.fixture
def registry(db, tmp_path):
    """A model of tenant t whose job kept its step-4 checkpoint (step 2 pruned), an API client of t and one of u
    (each with a validated training file), and the store the model's version is in."""
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app
    from tuneforge.engine.base_models import ensure_builtin_model

    home = Path(os.environ["TUNEFORGE_HOME"])
    keys = FolderKeyProvider(home / "keys")
    store = LocalArtifactStore(home / "artifacts", keys=keys)
    first, file_id = make_job(db, keep_last=1)
    other_job, other_file = make_job(db, tenant="u")
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(12)])
    report = inspect_dataset(data, display_name="train.jsonl").model_dump(mode="json")
    with db.session() as session:
        for tenant, fid, job_id in (("t", file_id, first), ("u", other_file, other_job)):
            file_rows.get_file(session, tenant_id=tenant, file_id=fid).report = report
            job_rows.get_job_any_tenant(session, job_id=job_id).status = "succeeded"  # only the jobs below are queued
    model_id = trained(db, store, home, first, base_dir=ensure_builtin_model("tiny-llama"), steps={2: 2, 4: 3},
                       final_seed=1)
    settings = Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False))
    app = create_app(settings, db=db)
    clients = {}
    with db.session() as session:
        for tenant in ("t", "u"):
            _, secret = tenant_rows.create_api_key(session, tenant_id=tenant)
            clients[tenant] = TestClient(app, headers={"Authorization": f"Bearer {secret}"})
    return {"model": model_id, "checkpoint": f"{model_id}:ckpt-step-4", "pruned": f"{model_id}:ckpt-step-2",
            "file": file_id, "other_file": other_file, "client": clients["t"], "other": clients["u"],
            "settings": settings, "store": store, "first_job": first, "home": home, "keys": keys}


def ppo_request(file_id: str, reward_model: str) -> dict:
    return {"model": "tiny-llama", "training_file": file_id, "method": {"type": "ppo"},
            "tuneforge": {"training": {"max_steps": 1}, "rollout": {"max_new_tokens": 4, "prompts_per_step": 2,
                                                                     "reward_model": reward_model}}}


def judged_request(file_id: str, judge: str) -> dict:
    return {"model": "tiny-llama", "training_file": file_id,
            "tuneforge": {"evaluation": {"graders": [{"type": "score_model", "name": "judge", "model": judge,
                                                      "input": JUDGE_INPUT}]}}}


def test_a_checkpoint_is_a_reward_or_judge_model_pinned_and_holds_its_model(db, registry):
    client, checkpoint = registry["client"], registry["checkpoint"]
    ppo = client.post("/v1/fine_tuning/jobs", json=ppo_request(registry["file"], checkpoint))
    assert ppo.status_code == 200, ppo.text
    judged = client.post("/v1/fine_tuning/jobs", json=judged_request(registry["file"], checkpoint))
    assert judged.status_code == 200, judged.text
    with db.read_session() as session:  # pinned as written: a kept checkpoint never changes
        assert job_rows.get_job_any_tenant(session, job_id=ppo.json()["id"]).spec["rollout"]["reward_model"] == checkpoint
        graders = job_rows.get_job_any_tenant(session, job_id=judged.json()["id"]).spec["evaluation"]["graders"]
        assert graders[0]["model"] == checkpoint

    pruned = client.post("/v1/fine_tuning/jobs", json=ppo_request(registry["file"], registry["pruned"]))
    assert pruned.status_code == 400 and pruned.json()["error"]["code"] == "model_not_found", pruned.text
    assert "no kept checkpoint at step 2" in pruned.json()["error"]["message"]
    assert pruned.json()["error"]["param"] == "tuneforge.rollout.reward_model"
    for request in (ppo_request(registry["other_file"], checkpoint), judged_request(registry["other_file"], checkpoint)):
        theirs = registry["other"].post("/v1/fine_tuning/jobs", json=request)  # another tenant's: a missing model
        assert theirs.status_code == 400 and theirs.json()["error"]["code"] == "model_not_found", theirs.text
        assert "no model with id" in theirs.json()["error"]["message"]
    missing = client.post("/v1/fine_tuning/jobs", json=judged_request(registry["file"], "ft:tiny-llama:t::nope:ckpt-step-4"))
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_not_found"

    # The queued jobs that score with or ask its checkpoint hold the model (the API's door and the registry's).
    refused = client.delete(f"/v1/models/{registry['model']}")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use", refused.text
    assert ppo.json()["id"] in refused.json()["error"]["message"]
    assert judged.json()["id"] in refused.json()["error"]["message"]
    for job_id in (ppo.json()["id"], judged.json()["id"]):
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    with db.session() as session:
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=registry["model"]))
    gone = client.post("/v1/fine_tuning/jobs", json=ppo_request(registry["file"], checkpoint))
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "model_not_found"


def test_an_eval_run_or_export_takes_the_model_not_a_checkpoint(db, registry):
    from tuneforge.registry.named_models import NamedModelError, check_named_models
    from tuneforge.spec import validate_job_spec

    from tuneforge.spec.job import NO_DATASET

    spec = validate_job_spec({"method": "export", "model": {"base_model": "tiny-llama"}, "dataset": {"path": NO_DATASET},
                              "export_run": {"model": registry["checkpoint"]},
                              "deploy": {"target": "vllm", "format": "adapter", "fallback": "merged"}})
    with db.read_session() as session:
        with pytest.raises(NamedModelError, match="export_run.model: .* is a checkpoint") as refused:
            check_named_models(session, tenant_id="t", spec=spec)
        assert refused.value.code == "invalid_value" and refused.value.where == "export_run.model"
        check_named_models(session, tenant_id="t", spec=spec.model_copy(update={"export_run": spec.export_run.model_copy(
            update={"model": registry["model"]})}))  # the model itself is fine


def sweep_body(file_id: str, base_model: str, **fields) -> dict:
    return {"name": "ckpt-sweep", "sampler": "grid", "parallelism": 2,
            "base": {"model": {"base_model": base_model}, "dataset": {"path": file_id}, "training": {"max_steps": 2},
                     "evaluation": {"metrics": ["loss"]}},
            "space": {"training.learning_rate": {"type": "choice", "values": [1e-4, 1e-3]}},
            "objectives": [{"metric": "loss"}], **fields}


def test_a_sweep_trains_its_trials_from_a_checkpoint(db, registry):
    from tuneforge.db import workers as worker_rows

    client, checkpoint = registry["client"], registry["checkpoint"]
    with db.session() as session:  # a worker that can hold the trials (the driver checks them as job requests)
        worker_rows.register_worker(session, worker_id="w", hostname="h", executor="local",
                                    inventory=[{"gpu_type": "cpu", "gpus": 4, "strategies": ["ddp"]}])
    created = client.post("/v1/sweeps", json=sweep_body(registry["file"], checkpoint))
    assert created.status_code == 200, created.text
    in_space = sweep_body(registry["file"], "tiny-llama")
    in_space["space"] = {"model.base_model": {"type": "choice", "values": ["tiny-llama", checkpoint]}}
    assert client.post("/v1/sweeps", json=in_space).status_code == 200
    for body, where in ((sweep_body(registry["file"], registry["pruned"]), "no kept checkpoint at step 2"),
                        (judged_sweep := sweep_body(registry["file"], "tiny-llama"), "no model with id")):
        if body is judged_sweep:
            body["base"]["evaluation"]["graders"] = [{"type": "score_model", "name": "judge", "input": JUDGE_INPUT,
                                                       "model": "ft:tiny-llama:u::other:ckpt-step-4"}]
        refused = client.post("/v1/sweeps", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found", refused.text
        assert where in refused.json()["error"]["message"]
    theirs = registry["other"].post("/v1/sweeps", json=sweep_body(registry["other_file"], checkpoint))
    assert theirs.status_code == 400 and theirs.json()["error"]["code"] == "model_not_found"

    # The driver submits each trial as a job that trains from the checkpoint, pinned as it is.
    driver = SweepDriver(db, registry["settings"])
    assert driver.run_once() >= 2
    with db.read_session() as session:
        trials = sweep_rows.trials_with_jobs(session, sweep_id=created.json()["id"])
        assert [job.spec["model"]["base_model"] for _, job in trials] == [checkpoint, checkpoint]

    # A checkpoint pruned after the sweep was made (here: named by a sweep made behind the router's back) fails
    # its trials with the registry's reason instead of a job that would fail at launch.
    spec = validate_sweep_spec(sweep_body(registry["file"], registry["pruned"]))
    with db.session() as session:
        stale = sweep_rows.create_sweep(session, tenant_id="t", name=spec.name, spec=spec.model_dump(mode="json")).id
    driver.run_once()
    with db.read_session() as session:
        stale_trials = sweep_rows.trials_with_jobs(session, sweep_id=stale)
    assert stale_trials and all(t.status == "failed" and job is None for t, job in stale_trials)
    assert "model.base_model: " in stale_trials[0][0].error and "no kept checkpoint at step 2" in stale_trials[0][0].error


def sealed_upload(db, store, path: Path, *, tenant: str) -> str:
    """A processed file of the tenant whose bytes are its sealed blob, as the Files API commits an upload."""
    writer = store.open_staging(max_bytes=1 << 30, name=path.name, tenant_id=tenant)
    try:
        writer.write(path.read_bytes())
        staged = writer.finish()
        with db.session() as session:
            store.commit(staged, session=session)
            return file_rows.create_file(
                session, tenant_id=tenant, filename=path.name, purpose="fine-tune", size=staged.size,
                sha256=staged.sha256, report=inspect_dataset(path, display_name=path.name).model_dump(mode="json"),
                status=file_rows.PROCESSED, status_details=None).id
    finally:
        writer.discard()


def test_the_worker_assembles_a_checkpoint_reward_model_into_the_jobs_inputs(db, registry, tmp_path):
    """The worker's claim: the reward model is the version's files with the checkpoint's weights, decrypted from
    the job directory sealed at rest into the PPO job's own inputs, and gone with them when the run ends."""
    from conftest import REPO

    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker
    from tuneforge.spec.jobdir import read_spec

    home, first = registry["home"], registry["first_job"]
    weights = (home / "jobs" / first / "checkpoints" / "step-000004" / "adapter_model.safetensors").read_bytes()
    seal_job_dir(db, registry["keys"], tenant_id="t", job_id=first, job_dir=home / "jobs" / first)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "examples" / "rl" / "prompts.jsonl").read_text().splitlines(keepends=True)[:12]))
    file_id = sealed_upload(db, registry["store"], prompts, tenant="t")
    ppo = registry["client"].post("/v1/fine_tuning/jobs", json=ppo_request(file_id, registry["checkpoint"]))
    assert ppo.status_code == 200, ppo.text
    job_dir = registry["settings"].jobs_dir / ppo.json()["id"]
    worker = Worker(db, registry["settings"], build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    try:
        worker.run_once()  # claims, stages, materializes, launches (the recipe is stopped below)
        with db.read_session() as session:
            job = job_rows.get_job_any_tenant(session, job_id=ppo.json()["id"])
        assert job.status == "running", job.error
        reward_dir = Path(read_spec(job_dir).rollout.reward_model)
        assert reward_dir.is_relative_to(job_dir / "inputs" / "models") and reward_dir.name.endswith("-ckpt-step-4")
        assert (reward_dir / "adapter_model.safetensors").read_bytes() == weights
        assert json.loads((reward_dir / "adapter_config.json").read_text())["r"] == 4
        assert not (reward_dir / "optimizer.pt").exists()
    finally:
        worker.shutdown()
    assert not reward_dir.exists()  # no decrypted copy outlives the run


def run_to_end(worker, db, job_id: str, timeout: float = 240.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once()
        with db.read_session() as session:
            job = job_rows.get_job_any_tenant(session, job_id=job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status}")


# Two recipes on the tiny model through a real worker: about 15 s, within the default suite's budget for a flow.
def test_a_ppo_job_trains_with_a_reward_models_checkpoint(db, tmp_path):
    """A reward job keeps its checkpoints; a PPO job names one as its reward model and trains with it on a real
    worker (with encryption at rest: the reward job's directory is sealed, the checkpoint decrypted into the PPO
    job's inputs and gone when its run ends)."""
    from fastapi.testclient import TestClient
    from conftest import REPO

    from tuneforge.api.app import create_app
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    home = Path(os.environ["TUNEFORGE_HOME"])
    settings = Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False))
    store = LocalArtifactStore.from_settings(settings)
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        _, secret = tenant_rows.create_api_key(session, tenant_id="t")
    client = TestClient(create_app(settings, db=db), headers={"Authorization": f"Bearer {secret}"})

    def first_lines(path: Path, rows: int) -> Path:
        small = tmp_path / path.name
        small.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
        return small

    pairs = sealed_upload(db, store, first_lines(REPO / "examples" / "preference" / "train.jsonl", 16), tenant="t")
    prompts = sealed_upload(db, store, first_lines(REPO / "examples" / "rl" / "prompts.jsonl", 12), tenant="t")
    tiny = {"dataset": {"max_seq_length": 192}, "evaluation": {"max_eval_examples": 4, "max_new_tokens": 8},
            "adapter": {"rank": 4, "alpha": 8}}
    reward = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": pairs, "suffix": "rm", "method": {"type": "reward"},
        "tuneforge": tiny | {"training": {"max_steps": 3, "batch_size": 4},
                             "checkpoint": {"every_steps": 1, "keep_last": 3}}})
    assert reward.status_code == 200, reward.text
    worker = Worker(db, settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    try:
        done = run_to_end(worker, db, reward.json()["id"])
        assert done.status == "succeeded", done.error
        checkpoint = f"{done.fine_tuned_model}:ckpt-step-2"
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert checkpoint in listed, listed
        ppo = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": prompts, "method": {"type": "ppo"},
            "tuneforge": tiny | {"training": {"max_steps": 1},
                                 "rollout": {"max_new_tokens": 8, "prompts_per_step": 2, "reward_model": checkpoint}}})
        assert ppo.status_code == 200, ppo.text
        trained_job = run_to_end(worker, db, ppo.json()["id"])
    finally:
        worker.shutdown()
    assert trained_job.status == "succeeded", trained_job.error
    assert trained_job.spec["rollout"]["reward_model"] == checkpoint
    events = client.get(f"/v1/fine_tuning/jobs/{trained_job.id}/events", params={"limit": 200}).json()["data"]
    assert any("train_reward" in (e.get("data") or {}) for e in events), json.dumps(events)[:2000]
    assert not (home / "jobs" / trained_job.id / "inputs").exists()  # the decrypted checkpoint went with the inputs
