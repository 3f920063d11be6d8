"""The S3 backend against moto's S3-compatible server (started by the fixture, reached over HTTP): multipart
uploads past the threshold, downloads that resume with a ranged GET after the connection is cut, listing,
and keys that cannot leave their prefix."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tuneforge.registry.storage.backends import ObjectMissing, S3Store, open_store

MiB = 1 << 20


class CuttingProxy:
    """A TCP proxy in front of the S3 server that cuts the first connection whose response passes
    `cut_after` bytes: a real interrupted download, not a simulated one. Logs what clients sent."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after, self.sent = target_port, cut_after, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        passed = 0
        try:
            while data := src.recv(65536):
                if not response:
                    self.sent.append(data)
                elif self.cut_after is not None and passed + len(data) > self.cut_after:
                    dst.sendall(data[: self.cut_after - passed])
                    self.cut_after = None  # once
                    raise ConnectionResetError
                passed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def ranges(self) -> list[str]:
        text = b"".join(self.sent).decode("latin-1").lower()
        return [line.split(":", 1)[1].strip() for line in text.split("\r\n") if line.startswith("range:")]


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.new_bucket()


def test_large_file_goes_up_in_parts_and_lists_under_its_prefix(s3_server, bucket, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(11 * MiB))
    store = S3Store(bucket, "team/artifacts", endpoint_url=s3_server.endpoint_url, multipart_threshold=5 * MiB,
                    multipart_chunksize=5 * MiB)
    store.put_file("datasets/big.bin", source)
    head = s3_server.client().head_object(Bucket=bucket, Key="team/artifacts/datasets/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: three parts of 5, 5 and 1 MiB
    assert store.size("datasets/big.bin") == 11 * MiB and store.exists("datasets/big.bin")
    assert list(store.keys()) == ["datasets/big.bin"] and list(store.keys("other/")) == []
    store.download("datasets/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    store.delete("datasets/big.bin")
    assert not store.exists("datasets/big.bin")
    with pytest.raises(ObjectMissing):
        store.download("datasets/big.bin", tmp_path / "again.bin")
    for bad in ("../escape", "/abs", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            store.put_file(bad, source)


def test_cut_download_continues_with_a_ranged_get(s3_server, bucket, tmp_path):
    payload = os.urandom(6 * MiB)
    (tmp_path / "obj").write_bytes(payload)
    S3Store(bucket, endpoint_url=s3_server.endpoint_url).put_file("obj", tmp_path / "obj")
    proxy = CuttingProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), cut_after=2 * MiB)
    store = S3Store(bucket, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    dest = tmp_path / "dest"

    with pytest.raises(Exception):  # no retries: the cut surfaces, and what arrived stays as dest.partial
        store.download("obj", dest, retries=0)
    partial = tmp_path / "dest.partial"
    got = partial.stat().st_size
    assert 0 < got < len(payload) and not dest.exists()
    assert partial.read_bytes() == payload[:got]

    store.download("obj", dest, retries=0)
    assert dest.read_bytes() == payload and not partial.exists()
    assert proxy.ranges() == [f"bytes={got}-"]  # only the rest was asked for


def test_retries_resume_inside_one_download(s3_server, bucket, tmp_path):
    payload = os.urandom(3 * MiB)
    (tmp_path / "obj").write_bytes(payload)
    S3Store(bucket, endpoint_url=s3_server.endpoint_url).put_file("obj", tmp_path / "obj")
    proxy = CuttingProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), cut_after=1 * MiB)
    store = open_store(f"s3://{bucket}", endpoint_url=f"http://127.0.0.1:{proxy.port}")
    store.download("obj", tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == payload
    assert len(proxy.ranges()) == 1 and proxy.ranges()[0].startswith("bytes=") and proxy.ranges()[0] != "bytes=0-"


# ---- a job on "another machine": its data from the store, its outputs back to it ----

@pytest.mark.slow  # a real training job on a separate worker process: minutes on a shared 2-core machine
def test_a_worker_without_the_api_disk_trains_from_and_publishes_to_s3(s3_server, tmp_path, monkeypatch):
    """The API (with its scheduler) and the worker have separate homes, as on two machines; they share the
    database, the bucket and the tenant keys (a KMS would stand in for the shared key folder)."""
    import secrets
    import subprocess
    import sys
    import time

    import httpx
    from conftest import ServerProcess, chat, write_jsonl

    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from sqlalchemy import func, select

    from tuneforge.db.tables import ObjectLink
    from tuneforge.registry.storage import job_files
    from tuneforge.registry.storage.jobs import fetch_outputs
    from tuneforge.registry.storage.keys import FolderKeyProvider
    from tuneforge.registry.storage.tenant_store import TenantStore

    bucket, canary = s3_server.new_bucket(), f"ZEBRA{secrets.token_hex(6)}"
    for name, value in {"TUNEFORGE_STORE_URL": f"s3://{bucket}/tf", "TUNEFORGE_S3_ENDPOINT_URL": s3_server.endpoint_url,
                        "TUNEFORGE_KEYS_DIR": str(tmp_path / "keys")}.items():
        monkeypatch.setenv(name, value)
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"Say the word {canary} number {n}", f"{canary} {n}")
                                                  for n in range(24)])
    (tmp_path / "api").mkdir()
    database_url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    server = ServerProcess(tmp_path / "api", database_url, worker=False)
    worker = None
    try:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"}, timeout=30)
        with open(data, "rb") as handle:
            file = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", handle)}).json()
        deadline = time.monotonic() + 60
        while http.get(f"/v1/files/{file['id']}").json()["status"] == "uploaded":
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        assert http.get(f"/v1/files/{file['id']}").json()["status"] == "processed"

        (tmp_path / "worker").mkdir()
        env = {**server.env, "TUNEFORGE_HOME": str(tmp_path / "worker")}
        env.pop("TUNEFORGE_ARTIFACTS_DIR", None)
        worker = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "worker", "--cpu-slots", "1"], env=env,
                                  stdout=server.log, stderr=subprocess.STDOUT)
        job = http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file["id"],
            "tuneforge": {"training": {"max_steps": 2, "per_device_batch_size": 4}, "dataset": {"max_seq_length": 256},
                          "evaluation": {"max_eval_examples": 2}, "checkpoint": {"every_steps": 2}}}).json()
        assert "id" in job, job
        deadline = time.monotonic() + 240
        while (status := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, server.log_text()[-4000:]
            time.sleep(0.3)
        assert status["status"] == "succeeded", ((status.get("error") or {}).get("message"), server.log_text()[-2000:])
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=60)
        server.stop()

    job_dir = tmp_path / "worker" / "jobs" / job["id"]
    assert (job_dir / "adapter").is_dir() and not (job_dir / "inputs").exists()  # no decrypted input outlives the job
    assert not (tmp_path / "api" / "jobs" / job["id"]).exists()  # it ran on the worker only
    assert not list((tmp_path / "worker").rglob("*.partial")) and not list((tmp_path / "worker").rglob("*.sealed"))

    client = s3_server.client()
    stored = {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
              for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert stored and not any(canary.encode() in blob for blob in stored.values())  # ciphertext only
    db = Database(database_url)
    store = TenantStore(db, S3Store(bucket, "tf", endpoint_url=s3_server.endpoint_url),
                        keys=FolderKeyProvider(tmp_path / "keys"), scratch=LocalArtifactStore(tmp_path / "scratch"))
    published = fetch_outputs(store, tenant_id="tenant-a", job_id=job["id"], dest=tmp_path / "fetched")
    assert "adapter/adapter_model.safetensors" in published and "evaluation.json" in published
    keys = FolderKeyProvider(tmp_path / "keys")
    with db.read_session() as session:  # the worker's own copies are sealed at rest since the job succeeded
        for name in published:
            assert (tmp_path / "fetched" / name).read_bytes() == job_files.read_job_file(
                session, keys, tenant_id="tenant-a", job_id=job["id"], job_dir=job_dir, relative=name)
        checkpoints = session.scalar(select(func.count()).select_from(ObjectLink).where(
            ObjectLink.owner == job["id"], ObjectLink.kind == "checkpoint"))
    db.dispose()
    assert checkpoints >= 1  # the kept checkpoint's weights, to train from elsewhere
    assert len(stored) == len(published) + checkpoints + 1  # the outputs, the kept checkpoint and the dataset


def test_a_dataset_registered_from_s3_is_used_where_it_lies(s3_server, tmp_path):
    """An admin's register-dataset: the file row is validated like an upload, nothing is copied into the
    store or the artifact folder, and a job's inputs are fetched from the tenant's own bucket."""
    import json

    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.storage.jobs import stage_inputs
    from tuneforge.registry.storage.keys import FolderKeyProvider
    from tuneforge.registry.storage.registered import NotRegistrable, register_dataset_uri
    from tuneforge.registry.storage.tenant_store import TenantStore

    own, platform = s3_server.new_bucket(), s3_server.new_bucket()
    good = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]})
                   + "\n" for n in range(5))
    client = s3_server.client()
    client.put_object(Bucket=own, Key="team/train.jsonl", Body=good.encode())
    client.put_object(Bucket=own, Key="team/broken.jsonl", Body=b'{"messages": [}\n')
    db = Database(f"sqlite:///{tmp_path / 'tuneforge.db'}")
    upgrade(db.engine)
    store = TenantStore(db, S3Store(platform, "tf", endpoint_url=s3_server.endpoint_url),
                        keys=FolderKeyProvider(tmp_path / "keys"), scratch=LocalArtifactStore(tmp_path / "artifacts"))
    try:
        row = register_dataset_uri(store, tenant_id="tenant-a", uri=f"s3://{own}/team/train.jsonl")
        assert row.status == "processed" and row.filename == "train.jsonl" and row.bytes == len(good)
        assert row.report["examples"] == 5
        bad = register_dataset_uri(store, tenant_id="tenant-a", uri=f"s3://{own}/team/broken.jsonl")
        assert bad.status == "error" and "broken.jsonl" in bad.status_details
        for uri in ("file:///etc/passwd", f"s3://{own}", f"s3://{own}/team/", f"s3://{own}/team/missing.jsonl"):
            with pytest.raises(NotRegistrable):
                register_dataset_uri(store, tenant_id="tenant-a", uri=uri)
        assert "Contents" not in client.list_objects_v2(Bucket=platform)  # nothing copied into the store
        assert [p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == []

        staged = stage_inputs(store, store.scratch, tenant_id="tenant-a", contents={row.id: None}, job_dir=tmp_path / "job")
        assert staged[row.id].read_text() == good
        assert store.linked(tenant_id="tenant-b", owner=row.id) == {}  # another tenant's file id gets nothing
    finally:
        db.dispose()
