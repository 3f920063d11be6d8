"""`tuneforge sweep run SWEEP.yaml` (the local sweep: embedded driver and worker) with encryption at rest on, as
`tuneforge server` stores a sweep's data: the data file is the local tenant's sealed blob, each trial's job
directory is sealed when its run ends, and nothing under TUNEFORGE_HOME holds the data's bytes in the clear;
the sweep still shows and its best version still downloads. With encryption at rest off, the blob is plaintext."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLE_DATA

from tuneforge.db import model_versions as version_rows
from tuneforge.db import sweeps as sweep_rows
from tuneforge.db.session import Database

pytest.importorskip("torch")
MARKER = "Quillon Zembrowski-Arkwright"  # a distinctive line of the data, searched for in the clear


def sweep_file(tmp_path: Path) -> Path:
    rows = EXAMPLE_DATA.joinpath("train.jsonl").read_text().splitlines()[:24]
    rows.append(json.dumps({"messages": [{"role": "user", "content": f"{MARKER} lives in Oslo and is 41."},
                                         {"role": "assistant", "content": f'{{"name": "{MARKER}", "age": 41}}'}]}))
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(rows) + "\n")
    spec = tmp_path / "data" / "sweep.yaml"
    spec.write_text(f"""name: local-sealed
sampler: grid
parallelism: 2
base:
  model: {{base_model: tiny-llama}}
  dataset: {{path: {data}, max_seq_length: 256}}
  adapter: {{rank: 4, alpha: 8}}
  training: {{max_steps: 2, per_device_batch_size: 4, batch_size: 4, seed: 0}}
  evaluation: {{metrics: [loss], max_eval_examples: 4, eval_before_training: false}}
  checkpoint: {{every_steps: 1}}
space:
  training.learning_rate: {{type: choice, values: [0.001, 0.003]}}
objectives:
  - metric: loss
""")
    return spec


def tuneforge(home: Path, *args: str, encrypt: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "OMP_NUM_THREADS": "1", "TUNEFORGE_POLL_SECONDS": "0.2",
           "TUNEFORGE_ENCRYPT_AT_REST": "true" if encrypt else "false"}
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def holders_of(home: Path, needle: bytes) -> list[Path]:
    return [path for path in home.rglob("*") if path.is_file() and not path.is_symlink()
            and needle in path.read_bytes()]


def test_a_local_sweep_seals_its_data_and_trial_directories(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shown = tuneforge(home, "sweep", "run", str(sweep_file(tmp_path)), "--cpu-slots", "2").stdout
    assert ": succeeded" in shown.splitlines()[0], shown

    db = Database(f"sqlite:///{home / 'tuneforge.db'}")
    try:
        with db.read_session() as session:
            sweep = sweep_rows.list_sweeps(session, tenant_id="default", limit=1, after=None)[0][0]
            trials = sweep_rows.trials_with_jobs(session, sweep_id=sweep.id)
            best = version_rows.alias_target(session, tenant_id="default", name="local-sealed", alias="best")
            blob_rows = session.execute(db_text("SELECT count(*) FROM sealed_blobs WHERE tenant_id = 'default'")).scalar()
    finally:
        db.dispose()
    assert sweep.status == "succeeded" and [t.status for t, _ in trials] == ["succeeded", "succeeded"]
    assert best is not None and best.model_id == sweep.best_model
    assert blob_rows >= 1  # the data file: the local tenant's sealed blob, as an upload's is
    assert not (home / "artifacts" / "sha256").exists() or not any((home / "artifacts" / "sha256").rglob("*"))

    assert holders_of(home, MARKER.encode()) == []  # no plaintext copy of the data's bytes anywhere
    for _, job in trials:
        job_dir = home / "jobs" / job.id
        checkpoints = [p for p in (job_dir / "checkpoints").rglob("*") if p.is_file()]
        adapter = [p for p in (job_dir / "adapter").rglob("*") if p.is_file()]
        assert checkpoints and adapter
        assert all(p.name.endswith(".tfe") for p in checkpoints + adapter), checkpoints + adapter

    assert f"best: trial {next(t.number for t, _ in trials if t.job_id == sweep.best_job_id)}" in \
        tuneforge(home, "sweep", "show", sweep.id).stdout
    out = tmp_path / "best"
    tuneforge(home, "models", "download", "local-sealed:best", "--tenant", "default", "--out", str(out))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "adapter_model.safetensors").stat().st_size > 0


def db_text(sql: str):
    from sqlalchemy import text

    return text(sql)


@pytest.mark.parametrize("encrypt", [True, False])
def test_the_local_sweeps_data_file_is_stored_as_the_server_stores_an_upload(tmp_path, monkeypatch, encrypt):
    """Sealed for the local tenant with encryption at rest, a plaintext blob without (as before); the worker's
    staging reads either back; a file that is no dataset leaves neither a blob nor a row."""
    from tuneforge.control_plane_cli import _database
    from tuneforge.db import files as file_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.sweep_cli import LOCAL_TENANT, SweepInputError, _local_store, _store_local_file

    monkeypatch.setenv("TUNEFORGE_ENCRYPT_AT_REST", "true" if encrypt else "false")
    data = Path(EXAMPLE_DATA / "train.jsonl")
    settings, db = _database()
    store = _local_store(settings)
    try:
        with db.session() as session:
            tenant_rows.ensure_tenant(session, tenant_id=LOCAL_TENANT)
            file_id = _store_local_file(session, store, str(data))
        with db.read_session() as session:
            row = file_rows.get_file(session, tenant_id=LOCAL_TENANT, file_id=file_id)
            content = store.find_content(session, tenant_id=LOCAL_TENANT, sha256=row.sha256, holder=file_id)
            sealed = session.execute(db_text("SELECT count(*) FROM sealed_blobs")).scalar()
        assert row.status == file_rows.PROCESSED and row.report["valid"]
        plain = store.path_of(row.sha256)
        assert plain.is_file() != encrypt and sealed == (1 if encrypt else 0)
        copy = tmp_path / "copy.jsonl"
        store.write_plaintext(content, copy)
        assert copy.read_bytes() == data.read_bytes()

        bad = tmp_path / "bad.jsonl"
        bad.write_text("not json\n")
        with db.session() as session, pytest.raises(SweepInputError, match="bad.jsonl"):
            _store_local_file(session, store, str(bad))
        with db.read_session() as session:
            assert session.execute(db_text("SELECT count(*) FROM files")).scalar() == 1
            assert session.execute(db_text("SELECT count(*) FROM sealed_blobs")).scalar() == sealed
        assert len([p for p in (settings.artifacts_dir / "sha256").rglob("*") if p.is_file()]) == (0 if encrypt else 1)
    finally:
        db.dispose()
