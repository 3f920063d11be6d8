"""Attacks on the files API (issue 10), each against a real `tuneforge server` process: another tenant's delete
removing a blob a paused job needs, decompression and record bombs, oversized bodies (announced and chunked),
hostile filenames, and staging leftovers of a server killed mid-upload. Each test fails if its attack works
again."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, chat, post_file, wait_validated, write_jsonl
from sqlalchemy import select

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.db.tables import File, Job
from tuneforge.registry.artifacts import LocalArtifactStore, sweep_staging
from tuneforge.scheduler.reaper import STUCK_VALIDATING_S, Reaper
from tuneforge.scheduler.upload_validation import UploadValidator
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec

MiB = 1 << 20
TINY_RECORD = b'{"text": "a"}\n'
FAST_JOB = {"training": {"max_steps": 2, "per_device_batch_size": 2}, "dataset": {"max_seq_length": 256},
            "evaluation": {"max_eval_examples": 2, "eval_before_training": False}, "checkpoint": {"every_steps": 2}}


# ---- helpers ----------------------------------------------------------------------------------------


def start_server(tmp_path: Path, database_url: str, monkeypatch, *, worker: bool = False, **env: str) -> ServerProcess:
    """A server whose environment adds `env` (ServerProcess copies os.environ when it starts)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return ServerProcess(home, database_url, worker=worker)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """Attacks on the HTTP layer do not depend on the database: SQLite, the embedded default, is enough."""
    return f"sqlite:///{tmp_path / 'tuneforge.db'}"


def client(server: ServerProcess, tenant: str = "tenant-a") -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[tenant]}"}, timeout=30)


def wait_for(predicate, *, timeout: float, what: str, server: ServerProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n" + (server.log_text()[-4000:] if server else ""))


def blob_path(server: ServerProcess, content: bytes) -> Path:
    """Where a plaintext blob of these bytes would be (uploads are sealed by default: none should be)."""
    digest = hashlib.sha256(content).hexdigest()
    return server.home / "artifacts" / "sha256" / digest[:2] / digest


def tenant_blobs(server: ServerProcess, tenant: str) -> list[Path]:
    """The tenant's sealed upload blobs (artifacts/sealed/TENANT/ab/ID)."""
    return sorted(p for p in (server.home / "artifacts" / "sealed" / tenant).rglob("*") if p.is_file())


def staging_entries(server: ServerProcess) -> list[Path]:
    staging = server.home / "artifacts" / "staging"
    return sorted(staging.iterdir()) if staging.is_dir() else []


def child_pids(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def scheduler_of(server: ServerProcess) -> int:
    return next(p for p in child_pids(server.process.pid) if cmdline(p).endswith("tuneforge.cli scheduler "))


def validation_child(scheduler_pid: int) -> int | None:
    return next((p for p in child_pids(scheduler_pid) if "tuneforge.registry.datasets" in cmdline(p)), None)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """The two bombs of the probe, built in about a second: gzip members (compresslevel 9) of a repeated
    buffer, concatenated (a gzip reader inflates them as one stream)."""
    folder = tmp_path_factory.mktemp("bombs")

    def build(name: str, buffer: bytes, repeats: int) -> Path:
        member = gzip.compress(buffer, compresslevel=9)
        with open(folder / name, "wb") as out:
            for _ in range(repeats):
                out.write(member)
        return folder / name

    return {
        "newlines": build("newlines.jsonl.gz", b"\n" * (64 * MiB), 32),  # 2 GiB of newlines in ~2 MB
        "records": build("records.jsonl.gz", TINY_RECORD * 1_000_000, 10),  # 10 million tiny records
    }


# ---- defect 2: cross-tenant blob deletion ------------------------------------------------------------


@pytest.mark.slow_on_postgresql
def test_another_tenants_delete_keeps_the_blob_a_paused_job_needs_until_nothing_refers_to_it(
        tmp_path, database_url, monkeypatch):
    server = start_server(tmp_path, database_url, monkeypatch, TUNEFORGE_BLOB_GRACE_SECONDS="1")
    try:
        a, b = client(server, "tenant-a"), client(server, "tenant-b")
        content = (EXAMPLE_DATA / "train.jsonl").read_bytes()
        mine = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])
        job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": mine["id"],
                                                   "tuneforge": FAST_JOB}).json()
        assert job["status"] == "queued", job
        assert a.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"
        assert a.delete(f"/v1/files/{mine['id']}").json()["deleted"]  # A's paused job still needs the bytes

        # The attack: B uploads the same bytes and deletes its copy; the blob must stay for A's job.
        theirs = wait_validated(b, post_file(b, EXAMPLE_DATA / "train.jsonl", "b.jsonl")["id"])
        assert b.delete(f"/v1/files/{theirs['id']}").json()["deleted"]
        time.sleep(4)  # several collector passes, each past the 1 s grace
        (upload_blob,) = tenant_blobs(server, "tenant-a")
        assert not blob_path(server, content).exists()
        assert tenant_blobs(server, "tenant-b") == []  # B's own sealed copy (nothing is shared) went with B's file

        # A resumes, and a worker trains on the bytes.
        assert a.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
        server.start_worker()
        done = wait_for(lambda: (j := a.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"]
                        in ("succeeded", "failed", "cancelled") and j, timeout=300, what="the job", server=server)
        assert done["status"] == "succeeded", done["error"]

        # Nothing refers to the bytes any more: the collector removes them (the job's model version is A's own
        # sealed blobs now, which stay).
        wait_for(lambda: not upload_blob.exists(), timeout=30, what="the collector", server=server)
    finally:
        server.stop()


def test_collector_keeps_blobs_that_live_rows_or_active_jobs_refer_to(tmp_path, database_url):
    """One pass of the collector against each kind of reference, on both databases."""
    db = Database(database_url)
    upgrade(db.engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    settings = Settings.from_env(database_url=database_url, artifacts_dir=tmp_path / "artifacts", blob_grace_seconds=0)

    def stored(content: bytes) -> str:
        writer = store.open_staging(max_bytes=MiB)
        writer.write(content)
        staged = writer.finish()
        store.commit(staged)
        writer.discard()
        old = time.time() - 60
        os.utime(store.path_of(staged.sha256), (old, old))
        return staged.sha256

    live, deleted, for_job, orphan = (stored(f"{n}\n".encode()) for n in ("live", "deleted", "for-job", "orphan"))
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        rows = {}
        for name, sha in (("live", live), ("deleted", deleted), ("for_job", for_job)):
            rows[name] = file_rows.create_file(session, tenant_id="t", filename=f"{name}.jsonl", purpose="fine-tune",
                                               size=5, sha256=sha, report={}, status="processed", status_details=None)
        spec = validate_job_spec({"dataset": {"path": rows["for_job"].id}})
        job = job_rows.create_job(session, tenant_id="t", spec=spec, model="tiny-llama",
                                  training_file=rows["for_job"].id, validation_file=None, suffix=None, metadata=None)
        for name in ("deleted", "for_job"):
            rows[name].deleted_at = int(time.time()) - 60
    from tuneforge.scheduler.blobs import BlobCollector

    collector = BlobCollector(db, settings, store)
    assert collector.run_once()["removed"] == 2  # the orphan, and the file deleted with nothing using it
    assert store.exists(live) and store.exists(for_job) and not store.exists(deleted) and not store.exists(orphan)
    with db.session() as session:
        session.get(Job, job.seq).status = "cancelled"
    assert collector.run_once()["removed"] == 1 and not store.exists(for_job) and store.exists(live)
    db.dispose()


# ---- defect 3: bombs, out-of-request validation, jobs waiting on it ------------------------------------


def test_bombs_end_in_error_quickly_while_the_api_keeps_answering(tmp_path, sqlite_url, monkeypatch, bombs):
    server = start_server(tmp_path, sqlite_url, monkeypatch, TUNEFORGE_VALIDATION_MAX_MEMORY_BYTES=str(300 * MiB))
    try:
        a = client(server)
        for kind, bomb in bombs.items():
            started = time.monotonic()
            uploaded = post_file(a, bomb)
            assert uploaded["status"] == "uploaded" and time.monotonic() - started < 10, uploaded
            for path in ("/health", "/v1/files", f"/v1/files/{uploaded['id']}"):  # promptly, meanwhile
                asked = time.monotonic()
                assert a.get(path).status_code == 200 and time.monotonic() - asked < 2.0
            file = wait_validated(a, uploaded["id"], timeout=60)
            took = time.monotonic() - started
            assert file["status"] == "error", file
            # It names the file and the bound; not the memory bound: the validation stayed under 300 MiB.
            assert file["status_details"].startswith(bomb.name), file
            assert ("has more than 10,000,000 lines" in file["status_details"]
                    or "inflates to more than 100 times its size" in file["status_details"]), file
            assert took < 30, f"{kind}: {took:.1f} s"
            report = a.get(f"/v1/files/{uploaded['id']}/validation").json()
            assert report["status"] == "error" and report["problems"][0]["kind"] == "too_large"
        assert peak_rss_bytes(server.process.pid) < 400 * MiB  # the API never held a bomb in memory
        assert staging_entries(server) == []
    finally:
        server.stop()


@pytest.mark.slow_on_postgresql
def test_sigterm_interrupts_a_validation_and_the_next_scheduler_validates_the_file_again(
        tmp_path, database_url, monkeypatch, bombs):
    # Bounds lifted so the 10 million records take minutes to validate.
    server = start_server(tmp_path, database_url, monkeypatch, TUNEFORGE_VALIDATION_MAX_RATIO="1e9",
                          TUNEFORGE_VALIDATION_MAX_LINES="1000000000")
    try:
        a = client(server)
        scheduler = scheduler_of(server)
        uploaded = post_file(a, bombs["records"])
        validating = wait_for(lambda: validation_child(scheduler), timeout=30, what="the validation child")
        time.sleep(1.0)
        asked = time.monotonic()
        assert a.get("/v1/files").status_code == 200 and time.monotonic() - asked < 2.0

        os.kill(scheduler, signal.SIGTERM)
        wait_for(lambda: not alive(scheduler), timeout=15, what="the scheduler to stop")
        assert not alive(validating)
        assert a.get(f"/v1/files/{uploaded['id']}").json()["status"] == "uploaded"
        db = Database(database_url)
        with db.session() as session:
            row = session.scalar(select(File).where(File.id == uploaded["id"]))
            assert row.validation_owner is None and row.validation_expires_at is None  # the claim was given back
        db.dispose()
        assert staging_entries(server) == []

        # The next scheduler validates it again (here with a 2 s wall-time bound, which it passes).
        env = {**server.env, "TUNEFORGE_VALIDATION_TIMEOUT_SECONDS": "2"}
        again = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "scheduler"], env=env,
                                 stdout=server.log, stderr=subprocess.STDOUT)
        try:
            file = wait_validated(a, uploaded["id"], timeout=60)
            assert file["status"] == "error" and "took longer than 2 s to validate" in file["status_details"], file
        finally:
            again.terminate()
            again.wait(30)
        assert staging_entries(server) == []
    finally:
        server.stop()


def test_a_job_on_a_file_not_validated_yet_waits_then_is_admitted_or_failed(tmp_path, database_url, monkeypatch):
    server = start_server(tmp_path, database_url, monkeypatch)
    try:
        a = client(server)
        scheduler = scheduler_of(server)
        bad = write_jsonl(tmp_path / "bad.jsonl", [chat(f"q{i}", f"a{i}") for i in range(11)] + ["{nope"])
        os.kill(scheduler, signal.SIGSTOP)  # hold validation back: the files stay "uploaded"
        try:
            good_file, bad_file = post_file(a, EXAMPLE_DATA / "train.jsonl"), post_file(a, bad)
            jobs = {name: a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": f["id"],
                                                                "tuneforge": FAST_JOB}).json()
                    for name, f in (("good", good_file), ("bad", bad_file))}
            assert [j["status"] for j in jobs.values()] == ["validating_files"] * 2, jobs
            assert a.get(f"/v1/files/{good_file['id']}/validation").json()["status"] == "uploaded"
        finally:
            os.kill(scheduler, signal.SIGCONT)
        job = lambda name: a.get(f"/v1/fine_tuning/jobs/{jobs[name]['id']}").json()  # noqa: E731
        wait_for(lambda: job("good")["status"] == "queued", timeout=60, what="admission", server=server)
        failed = wait_for(lambda: (j := job("bad"))["status"] == "failed" and j, timeout=60, what="the bad job")
        assert failed["error"]["code"] == "invalid_training_file" and "bad.jsonl:12" in failed["error"]["message"]
    finally:
        server.stop()


def test_the_reaper_leaves_a_job_waiting_on_an_unvalidated_file(tmp_path, database_url):
    db = Database(database_url)
    upgrade(db.engine)
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        row = file_rows.create_file(session, tenant_id="t", filename="t.jsonl", purpose="fine-tune", size=1,
                                    sha256="0" * 64, report={}, status="uploaded", status_details=None)
        spec = validate_job_spec({"dataset": {"path": row.id}})
        job = job_rows.create_job(session, tenant_id="t", spec=spec, model="tiny-llama", training_file=row.id,
                                  validation_file=None, suffix=None, metadata=None)
        session.get(Job, job.seq).created_at -= 10 * STUCK_VALIDATING_S
    assert Reaper(db, Settings.from_env(database_url=database_url)).run_once()["admitted"] == 0
    with db.session() as session:
        assert session.get(Job, job.seq).status == "validating_files"
    db.dispose()


def test_the_memory_bound_kills_a_validation_and_names_the_bound(tmp_path, sqlite_url):
    db = Database(sqlite_url)
    upgrade(db.engine)
    settings = Settings.from_env(database_url=sqlite_url, artifacts_dir=tmp_path / "artifacts",
                                 validation_max_memory_bytes=4 * MiB)  # below what Python itself needs
    store = LocalArtifactStore(settings.artifacts_dir)
    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle, store.staging(handle, filename="t", max_bytes=MiB) as staged:
        store.commit(staged)
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        row = file_rows.create_file(session, tenant_id="t", filename="train.jsonl", purpose="fine-tune",
                                    size=staged.size, sha256=staged.sha256, report={}, status="uploaded",
                                    status_details=None)
    assert UploadValidator(db, settings, store).run_once() == 1
    with db.session() as session:
        row = session.scalar(select(File).where(File.id == row.id))
        assert row.status == "error" and row.status_details.startswith("train.jsonl needed more than 4 MiB of memory")
    assert list((settings.artifacts_dir / "staging").iterdir()) == []
    db.dispose()


# ---- defect 4: the upload size limit, before the body hits the disk -----------------------------------


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _head(server: ServerProcess, boundary: str, extra: str) -> bytes:
    return (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.keys['tenant-a']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{extra}\r\n").encode()


def _part_head(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def test_an_announced_oversized_upload_is_refused_before_its_body_is_sent(tmp_path, sqlite_url, monkeypatch):
    (tmp_path / "tmp").mkdir()
    server = start_server(tmp_path, sqlite_url, monkeypatch, TUNEFORGE_MAX_UPLOAD_BYTES=str(MiB),
                          TMPDIR=str(tmp_path / "tmp"))
    try:
        with _connect(server) as sock:
            sock.sendall(_head(server, "b0undary", f"Content-Length: {500 * MiB}\r\n"))
            status, body = _read_response(sock, timeout=5)  # no body byte sent
        assert status == 413 and b'"file_too_large"' in body and b'"param":"file"' in body, body
        assert staging_entries(server) == [] and list((tmp_path / "tmp").iterdir()) == []
    finally:
        server.stop()


def test_a_chunked_oversized_upload_is_refused_as_soon_as_it_passes_the_limit(tmp_path, sqlite_url, monkeypatch):
    (tmp_path / "tmp").mkdir()
    server = start_server(tmp_path, sqlite_url, monkeypatch, TUNEFORGE_MAX_UPLOAD_BYTES=str(MiB),
                          TMPDIR=str(tmp_path / "tmp"))
    try:
        boundary, sent, block = "b0undary", 0, b"x" * (256 << 10)
        with _connect(server) as sock:
            sock.sendall(_head(server, boundary, "Transfer-Encoding: chunked\r\n"))
            head = _part_head(boundary)
            sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            response = None
            while sent < 500 * MiB:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                sock.settimeout(0.2)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        response = _read_response(sock, timeout=5)
                        break
                except TimeoutError:
                    continue
        assert response is not None
        status, body = response
        assert status == 413 and b'"file_too_large"' in body, body
        assert sent <= 4 * MiB, f"refused only after {sent / MiB:.1f} MiB"
        assert staging_entries(server) == [] and list((tmp_path / "tmp").iterdir()) == []
    finally:
        server.stop()


# ---- defect 6 (files): filenames that used to be 500s ------------------------------------------------


def multipart_body(filename: bytes | None, content: bytes, boundary: bytes = b"b0undary") -> bytes:
    disposition = b'form-data; name="file"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
    return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n")


@pytest.mark.parametrize("filename, says", [
    (b"..", "'..' is not a file name"),
    (b".", "'.' is not a file name"),
    (b"", "the filename is empty"),
    (None, "expected a file upload with a filename"),
    (b"train\x00.jsonl", "control character (U+0000)"),
    (b"train\x07.jsonl", "control character (U+0007)"),
    (b"train\x1b[31m.jsonl", "control character (U+001B)"),
    ("é".encode() * 128, "256 bytes in UTF-8"),  # 128 characters: a count of characters let it through
    (b"../../etc/passwd", "a name, not a path"),
    (b"dir/train.jsonl", "a name, not a path"),
    (b"dir\\train.jsonl", "a name, not a path"),
    (b"\xff\xfe.jsonl", "not UTF-8"),
])
def test_hostile_filenames_are_a_400_naming_the_file_and_store_nothing(server_for_names, filename, says):
    server, http = server_for_names
    content = (EXAMPLE_DATA / "train.jsonl").read_bytes()
    response = http.post("/v1/files", content=multipart_body(filename, content),
                         headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and says in error["message"], error
    assert http.get("/v1/files").json()["data"] == []
    assert not blob_path(server, content).exists() and tenant_blobs(server, "tenant-a") == []
    assert staging_entries(server) == []


def test_a_255_byte_unicode_filename_is_fine(server_for_names):
    server, http = server_for_names
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    response = http.post("/v1/files", content=multipart_body(name.encode(), (EXAMPLE_DATA / "val.jsonl").read_bytes()),
                         headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 200 and response.json()["filename"] == name, response.text
    assert http.delete(f"/v1/files/{response.json()['id']}").status_code == 200


@pytest.fixture(scope="module")
def server_for_names(tmp_path_factory):
    home = tmp_path_factory.mktemp("names-home")
    server = ServerProcess(home, f"sqlite:///{home / 'tuneforge.db'}", worker=False)
    with client(server) as http:
        yield server, http
    server.stop()


# ---- defect 8 (files): staging leftovers of a killed server ------------------------------------------


def test_a_killed_uploads_staging_is_swept_at_the_next_start_and_a_live_one_never(tmp_path, sqlite_url, monkeypatch):
    server = start_server(tmp_path, sqlite_url, monkeypatch)
    staging = server.home / "artifacts" / "staging"
    try:
        with _connect(server) as sock:
            boundary = "b0undary"
            sock.sendall(_head(server, boundary, "Transfer-Encoding: chunked\r\n"))
            head = _part_head(boundary) + b"x" * (3 * MiB)  # past one write batch: the staging file exists
            sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            in_flight = wait_for(lambda: staging_entries(server), timeout=10, what="the upload's staging folder")
            assert sweep_staging(staging) == [] and staging_entries(server) == in_flight  # live: its lock is held
            server.process.kill()  # the server dies mid-upload
            server.process.wait()
        assert staging_entries(server) == in_flight  # the leftover
    finally:
        server.stop()

    again = ServerProcess(server.home, sqlite_url, worker=False)
    try:
        wait_for(lambda: staging_entries(again) == [], timeout=30, what="the sweep at start", server=again)
    finally:
        again.stop()
