"""A job directory's outputs sealed at rest (registry/storage/job_files.py): every kind (checkpoints, the adapter,
the model, the evaluation report, exports) is ciphertext on disk and reads back identically; a resume's unseal
is all or nothing; a tampered, moved or shredded file is refused by name; rotation keeps them readable."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tuneforge.db import sealed_blobs as key_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.storage import job_files
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.registry.storage.tenant_keys import TenantKeys

MARKER = b"CANARY-7f3a9c"
SAFETENSORS_HEADER = b'{"weight":{"dtype":"F32"'  # what every plaintext safetensors file here starts with (after 8 bytes)


@pytest.fixture
def setup(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(db.engine)
    yield db, FolderKeyProvider(tmp_path / "keys"), tmp_path / "jobs" / "job_1"
    db.dispose()


def _safetensors(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(path))


def _job_dir(job_dir):
    """One file of every kind the worker seals, each holding the marker or a safetensors header."""
    step = job_dir / "checkpoints" / "step-000004"
    _safetensors(step / "adapter_model.safetensors")
    torch.save({"state": torch.ones(3), "note": MARKER.decode()}, step / "optimizer.pt")
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "note": MARKER.decode()}))
    (step / "manifest.json").write_text(json.dumps({"step": 4}))
    (job_dir / "checkpoints" / ".staging-step-000006-123").mkdir()  # a dead run's half-written save
    (job_dir / "checkpoints" / ".staging-step-000006-123" / "optimizer.pt").write_bytes(MARKER)
    _safetensors(job_dir / "adapter" / "adapter_model.safetensors")
    (job_dir / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    big = os.urandom((2 << 20) + 5) + MARKER  # three chunks
    (job_dir / "model").mkdir()
    (job_dir / "model" / "model.bin").write_bytes(big)
    (job_dir / "model" / "empty.txt").write_bytes(b"")
    (job_dir / "evaluation.json").write_text(json.dumps({"samples": [{"prompt": MARKER.decode()}]}))
    (job_dir / "export" / "adapter").mkdir(parents=True)
    (job_dir / "export" / "serve.json").write_text(json.dumps({"format": "adapter", "name": MARKER.decode()}))
    _safetensors(job_dir / "export" / "adapter" / "adapter_model.safetensors")
    (job_dir / "events.jsonl").write_text("{}\n")  # not an output: left as it is
    return {p.relative_to(job_dir).as_posix(): p.read_bytes() for p in job_dir.rglob("*")
            if p.is_file() and ".staging-" not in str(p) and p.name != "events.jsonl"}


def test_every_kind_is_ciphertext_on_disk_and_reads_back_identically(setup):
    db, keys, job_dir = setup
    plain = _job_dir(job_dir)
    report = job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    assert report.files == len(plain) and report.bytes == sum(len(b) for b in plain.values())
    assert not (job_dir / "checkpoints" / ".staging-step-000006-123").exists()
    on_disk = [p for p in job_dir.rglob("*") if p.is_file() and p.name != "events.jsonl"]
    assert sorted(p.relative_to(job_dir).as_posix() for p in on_disk) == sorted(n + ".tfe" for n in plain)
    for path in on_disk:
        data = path.read_bytes()
        assert data[:4] == b"TFE1" and MARKER not in data and SAFETENSORS_HEADER not in data, path
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    with db.read_session() as session:
        for name, expected in plain.items():
            assert job_files.read_job_file(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                           relative=name) == expected, name
        key, entries = job_files.folder_entries(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                                part="export")
    files = {e.name: e for e in entries if not e.is_dir}
    assert [e.name for e in entries if e.is_dir] == ["adapter"]
    for name, entry in files.items():
        with job_files.open_entry(key, entry) as handle:
            assert handle.read() == plain[f"export/{name}"]
        assert entry.size == len(plain[f"export/{name}"])
    assert job_files.sealed_plaintext_size(job_dir / "model" / "model.bin.tfe") == len(plain["model/model.bin"])
    assert job_files.sealed_plaintext_size(job_dir / "model" / "empty.txt.tfe") == 0
    # Sealing again is a no-op; a resume's unseal brings the checkpoints back byte for byte, and only them.
    assert job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir).files == 0
    assert job_files.unseal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir) == 4
    for name, expected in plain.items():
        if name.startswith("checkpoints/"):
            assert (job_dir / name).read_bytes() == expected and not (job_dir / (name + ".tfe")).exists()
        else:
            assert not (job_dir / name).exists()


def test_a_tampered_moved_or_shredded_file_is_refused_and_leaves_no_plaintext(setup):
    db, keys, job_dir = setup
    plain = _job_dir(job_dir)
    job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    sealed = job_dir / "checkpoints" / "step-000004" / "optimizer.pt.tfe"
    data = bytearray(sealed.read_bytes())
    data[40] ^= 1
    sealed.write_bytes(bytes(data))
    with pytest.raises(job_files.SealedFileRefused, match=r"checkpoints/step-000004/optimizer.pt .*does not authenticate"):
        job_files.unseal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    left = sorted(p.name for p in (job_dir / "checkpoints" / "step-000004").iterdir())
    assert all(name.endswith(".tfe") for name in left), left  # all or nothing: no file came back, no partial copy
    with db.read_session() as session:
        with pytest.raises(job_files.SealedFileRefused, match="does not authenticate"):
            job_files.read_job_file(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                    relative="checkpoints/step-000004/optimizer.pt")
        # A sealed file renamed (or put under another job) does not open: its key and context name its path.
        os.replace(job_dir / "adapter" / "adapter_config.json.tfe", job_dir / "adapter" / "other.json.tfe")
        with pytest.raises(job_files.SealedFileRefused, match="does not authenticate"):
            job_files.read_job_file(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                    relative="adapter/other.json")
        with pytest.raises(job_files.SealedFileRefused, match="another tenant"):
            job_files.read_job_file(session, keys, tenant_id="tenant-b", job_id="job_1", job_dir=job_dir,
                                    relative="evaluation.json")
    # Rotation re-wraps the job's key (the row only); shredding makes every file unreadable.
    with db.read_session() as session:
        before = key_rows.find_job_key(session, job_id="job_1").key_version
    assert TenantKeys(db, keys).rotate("tenant-a") > before
    with db.read_session() as session:
        assert key_rows.find_job_key(session, job_id="job_1").key_version > before
        assert job_files.read_job_file(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                       relative="evaluation.json") == plain["evaluation.json"]
    TenantKeys(db, keys).shred("tenant-a")
    with db.read_session() as session:
        with pytest.raises(job_files.JobKeyShredded, match="crypto-shredded"):
            job_files.read_job_file(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                    relative="evaluation.json")


def test_another_job_reads_a_sealed_adapter_through_a_decrypted_copy(setup, tmp_path):
    db, keys, job_dir = setup
    plain = _job_dir(job_dir)
    dest = tmp_path / "reader" / "inputs" / "models" / "m1"
    assert job_files.plaintext_folder(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                      part="adapter", dest=dest) == job_dir / "adapter"  # plaintext: read in place
    job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    copy = job_files.plaintext_folder(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                      part="adapter", dest=dest)
    assert copy == dest and {p.name: p.read_bytes() for p in dest.iterdir()} == {
        name.split("/")[-1]: data for name, data in plain.items() if name.startswith("adapter/")}
    assert oct(dest.stat().st_mode & 0o777) == "0o700"


def test_an_export_sealed_at_rest_downloads_as_the_tar_of_its_plaintext(setup):
    """The Exports API's tar stream (api/routers/exports.py) over a sealed export folder: every file decrypted,
    folders kept, sizes exact; a tampered file cuts the stream short instead of sending other bytes."""
    import io
    import tarfile

    from tuneforge.api.routers.exports import _tar_stream
    from tuneforge.registry.storage.envelope import DecryptionFailed

    db, keys, job_dir = setup
    plain = _job_dir(job_dir)
    job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    with db.read_session() as session:
        key, entries = job_files.folder_entries(session, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir,
                                                part="export")
    with tarfile.open(fileobj=io.BytesIO(b"".join(_tar_stream(key, entries)))) as tar:
        assert tar.getnames() == ["adapter", "adapter/adapter_model.safetensors", "serve.json"]
        for name in ("adapter/adapter_model.safetensors", "serve.json"):
            assert tar.extractfile(name).read() == plain[f"export/{name}"]
    sealed = job_dir / "export" / "serve.json.tfe"
    sealed.write_bytes(sealed.read_bytes()[:-1] + bytes([sealed.read_bytes()[-1] ^ 1]))
    with pytest.raises(DecryptionFailed):
        b"".join(_tar_stream(key, entries))


def test_the_worker_decrypts_a_model_a_job_reads_to_the_same_folder_on_every_attempt(setup, tmp_path, monkeypatch):
    """The folder goes into the job's spec, which a later attempt must not change (write_spec raises SpecChanged):
    a reward model or judge decrypted for attempt 2 lands where attempt 1's copy was."""
    from types import SimpleNamespace

    from tuneforge.scheduler.worker import Worker

    db, keys, job_dir = setup
    _job_dir(job_dir)
    job_files.seal_job_dir(db, keys, tenant_id="tenant-a", job_id="job_1", job_dir=job_dir)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    worker = SimpleNamespace(db=db, store=SimpleNamespace(keys=keys))
    attempt = SimpleNamespace(tenant_id="tenant-a", job_dir=tmp_path / "jobs" / "reader")
    models = {"ft:tiny:t:job_1": SimpleNamespace(location="jobs/job_1/adapter", job_id="job_1")}
    first = Worker._model_dirs(worker, attempt, models)
    again = Worker._model_dirs(worker, attempt, models)
    assert first == again and first["ft:tiny:t:job_1"].parent == attempt.job_dir / "inputs" / "models"
    assert (first["ft:tiny:t:job_1"] / "adapter_model.safetensors").exists()
