"""Security of the control plane against real `tuneforge server` processes (no worker: jobs stay queued), on
SQLite and PostgreSQL: typed, hashed keys; scopes on every route of the OpenAPI document; expiry;
revocation across two API processes within the stated bound; the per-key rate limit shared by both
processes; tenant quotas on active jobs and stored bytes; the append-only audit log, free of secrets;
and HTTPS with --tls-cert / --tls-key."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, free_port, post_file, wait_validated

from tuneforge.api.auth import KEY_CACHE_SECONDS
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.session import Database

KEY_SHAPE = re.compile(r"tf_live_[0-9A-Za-z]{40}_[0-9A-Za-z]{6}")
QUEUED = {"training": {"max_steps": 2}}
SCOPES = ("read", "jobs", "files", "admin")


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def http(server, secret: str, **headers) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}", **headers}, timeout=30)


def admin_secret(server) -> str:
    return (server.home / "admin-key").read_text().strip()


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert code is None or body["error"]["code"] == code, body
    return body["error"]


def new_key(server, tenant: str = "tenant-a", **fields) -> dict:
    response = http(server, admin_secret(server)).post("/v1/tuneforge/keys", json={"tenant": tenant, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def processed_file(client: httpx.Client) -> str:
    file = wait_validated(client, post_file(client, EXAMPLE_DATA / "train.jsonl")["id"])
    assert file["status"] == "processed", file
    return file["id"]


def test_keys_are_typed_checksummed_hashed_shown_once_and_old_keys_still_work(server):
    created = new_key(server, name="ci", scopes=["read"])
    secret = created["key"]
    assert KEY_SHAPE.fullmatch(secret) and tenant_rows.well_formed(secret)
    assert created["scopes"] == ["read"] and created["hint"] == secret[:12] and created["admin"] is False
    for key in server.keys.values():  # `tuneforge keys create` makes the same kind
        assert KEY_SHAPE.fullmatch(key)
    assert http(server, secret).get("/v1/files").status_code == 200
    # A typo in a typed key fails its checksum: refused like an unknown key.
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    error_of(http(server, flipped).get("/v1/files"), 401, "invalid_api_key")
    # The database holds the hash only, and lists never show a secret.
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.read_session() as session:
        rows = tenant_rows.list_api_keys(session)
        dumped = json.dumps([{c.name: getattr(r, c.name) for c in r.__table__.columns} for r in rows], default=str)
        assert secret not in dumped and hashlib.sha256(secret.encode()).hexdigest() in dumped
    listed = http(server, admin_secret(server)).get("/v1/tuneforge/keys", params={"tenant": "tenant-a"})
    assert listed.status_code == 200
    assert secret not in listed.text and all(key not in listed.text for key in server.keys.values())
    assert {"hint": secret[:12], "scopes": ["read"]}.items() <= next(k for k in listed.json()["data"]
                                                                     if k["id"] == created["id"]).items()
    # A key of the format before this one (tf-..., stored by its hash, scopes from the migration) still works.
    with db.session() as session:
        _, legacy = tenant_rows.create_api_key(session, tenant_id="tenant-b", secret="tf-" + "x" * 43)
    db.dispose()
    assert http(server, legacy).get("/v1/files").status_code == 200


def test_every_route_declares_a_scope_and_a_key_without_it_gets_a_403(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    operations = [(method.upper(), path, op.get("x-tuneforge-scope")) for path, ops in spec["paths"].items()
                  for method, op in ops.items()]
    assert operations and all(scope in SCOPES for _, _, scope in operations), \
        [f"{m} {p}" for m, p, s in operations if s not in SCOPES]
    only = {scope: http(server, new_key(server, scopes=[scope])["key"]) for scope in SCOPES}
    for method, path, scope in operations:
        url = re.sub(r"\{[^}]+\}", "no-such-id", path)
        for held, client in only.items():
            response = client.request(method, url, json={} if method in ("POST", "PUT") else None)
            if held == scope:
                assert response.status_code != 403, (method, path, response.text)
            else:
                error = error_of(response, 403, "insufficient_scope")
                assert error["type"] == "permission_error" and repr(scope) in error["message"], (method, path, error)


def test_an_expired_key_is_refused_from_the_second_it_expires(server):
    created = new_key(server, expires_in=3600)
    assert abs(created["expires_at"] - (time.time() + 3600)) < 60
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    with db.session() as session:
        _, soon = tenant_rows.create_api_key(session, tenant_id="tenant-a", expires_at=int(time.time()) + 2)
        _, past = tenant_rows.create_api_key(session, tenant_id="tenant-a", expires_at=int(time.time()) - 1)
    db.dispose()
    error_of(http(server, past).get("/v1/files"), 401, "expired_api_key")
    client = http(server, soon)
    assert client.get("/v1/files").status_code == 200  # cached now: expiry is checked on every request anyway
    time.sleep(max(0.0, int(time.time()) + 2 - time.time()) + 1.1)
    error_of(client.get("/v1/files"), 401, "expired_api_key")


def api_process(server, port: int) -> subprocess.Popen:
    """A second API process on the same database (the API alone, as a team runs several behind a balancer)."""
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "tuneforge.api.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=server.env, stdout=server.log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60.0, **client) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=1.0, **client).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become healthy")


@pytest.fixture
def second_api(server):
    port = free_port()
    process = api_process(server, port)
    wait_healthy(f"http://127.0.0.1:{port}", process)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


def test_a_revoked_key_is_refused_at_once_here_and_within_the_cache_bound_on_another_process(server, second_api):
    created = new_key(server)
    here, there = http(server, created["key"]), httpx.Client(base_url=second_api, timeout=30,
                                                             headers={"Authorization": f"Bearer {created['key']}"})
    assert here.get("/v1/files").status_code == 200 and there.get("/v1/files").status_code == 200  # both cached
    revoked = http(server, admin_secret(server)).delete(f"/v1/tuneforge/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    started = time.monotonic()
    error_of(here.get("/v1/files"), 401, "invalid_api_key")  # the revoking process: immediately
    while there.get("/v1/files").status_code == 200:
        assert time.monotonic() - started < KEY_CACHE_SECONDS + 1.0, "the other process still accepts the key"
        time.sleep(0.05)
    bound = time.monotonic() - started
    print(f"revoked key refused by the other API process after {bound:.2f} s (KEY_CACHE_SECONDS={KEY_CACHE_SECONDS})")
    error_of(there.get("/v1/files"), 401, "invalid_api_key")
    # Listed as revoked, and revoking an unknown key is a 404.
    keys = http(server, admin_secret(server)).get("/v1/tuneforge/keys").json()["data"]
    assert next(k for k in keys if k["id"] == created["id"])["revoked_at"] is not None
    error_of(http(server, admin_secret(server)).delete("/v1/tuneforge/keys/key_nope"), 404, "not_found")


def test_the_rate_limit_is_one_bucket_per_key_shared_by_every_api_process(server, second_api):
    root = http(server, admin_secret(server))
    assert root.post("/v1/tuneforge/tenants", json={"name": "limited", "requests_per_minute": 60}).status_code == 200
    secret = new_key(server, tenant="limited")["key"]
    clients = [http(server, secret), httpx.Client(base_url=second_api, headers={"Authorization": f"Bearer {secret}"})]
    # Alternating between the processes: together they allow the burst (a minute's worth, 60) plus what
    # refilled meanwhile (1 a second), as one bucket would; two buckets would allow twice as much.
    started, allowed = time.monotonic(), 0
    while (refused := clients[allowed % 2].get("/v1/files")).status_code == 200:
        allowed += 1
        assert allowed <= 200, "no 429 in 200 requests"
    elapsed = time.monotonic() - started
    assert 60 <= allowed <= 60 + elapsed + 1, (allowed, elapsed)
    error_of(refused, 429, "rate_limit_exceeded")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 2
    error_of(clients[(allowed + 1) % 2].get("/v1/files"), 429, "rate_limit_exceeded")  # the other process too
    # Another key is not touched, and the limited key works again after Retry-After.
    assert http(server, server.keys["tenant-a"]).get("/v1/files").status_code == 200
    time.sleep(retry_after + 0.2)
    assert clients[0].get("/v1/files").status_code == 200


def test_quotas_on_active_jobs_and_stored_bytes(server):
    root, a = http(server, admin_secret(server)), http(server, server.keys["tenant-a"])
    size = (EXAMPLE_DATA / "train.jsonl").stat().st_size
    limits = {"max_active_jobs": 2, "max_storage_bytes": size + size // 2}
    assert root.put("/v1/tuneforge/tenants/tenant-a/limits", json=limits).json()["max_active_jobs"] == 2
    assert root.get("/v1/tuneforge/tenants/tenant-a").json()["max_storage_bytes"] == limits["max_storage_bytes"]
    training = processed_file(a)
    body = {"model": "tiny-llama", "training_file": training, "tuneforge": QUEUED}
    jobs = [a.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(2)]
    error_of(a.post("/v1/fine_tuning/jobs", json=body), 429, "quota_exceeded")
    assert len(a.get("/v1/fine_tuning/jobs").json()["data"]) == 2  # nothing was created
    assert a.post(f"/v1/fine_tuning/jobs/{jobs[0]}/cancel").status_code == 200
    assert a.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # a finished job frees its place
    usage = a.get("/v1/tuneforge/usage").json()
    assert usage["active_jobs"] == 2 and usage["stored_bytes"] == size and usage["max_active_jobs"] == 2
    # Storage: a second copy would pass the quota: refused on its Content-Length, and streamed (chunked) too.
    error_of(a.post("/v1/files", data={"purpose": "fine-tune"},
                    files={"file": ("again.jsonl", (EXAMPLE_DATA / "train.jsonl").read_bytes())}), 413,
             "storage_quota_exceeded")
    boundary = "tuneforgeboundary"

    def chunked():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.jsonl\"\r\n\r\n").encode()
        for _ in range(size // 4096 + 1):
            yield b"x" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    error_of(a.post("/v1/files", content=chunked(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}),
             413, "storage_quota_exceeded")
    assert [f["id"] for f in a.get("/v1/files").json()["data"]] == [training]
    # Another tenant's quota is its own; a small file still fits; deleting frees the bytes.
    assert post_file(http(server, server.keys["tenant-b"]), EXAMPLE_DATA / "train.jsonl")["bytes"] == size
    assert a.delete(f"/v1/files/{training}").status_code == 200
    assert post_file(a, EXAMPLE_DATA / "train.jsonl")["bytes"] == size


def test_every_mutating_call_is_audited_once_without_secrets_and_the_log_is_append_only(server):
    root, a = http(server, admin_secret(server)), http(server, server.keys["tenant-a"])
    calls: list[tuple[str, httpx.Response]] = []

    def call(client, method, url, **kwargs):
        request_id = f"test-{len(calls)}"
        response = client.request(method, url, headers={"X-Request-ID": request_id}, **kwargs)
        assert response.headers["X-Request-ID"] == request_id
        calls.append((request_id, response))
        return response

    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle:
        file_id = call(a, "POST", "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", handle)}).json()["id"]
    wait_validated(a, file_id)
    job = call(a, "POST", "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                        "tuneforge": QUEUED}).json()
    call(a, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    created = call(root, "POST", "/v1/tuneforge/keys", json={"tenant": "tenant-a", "name": "temp"}).json()
    call(root, "DELETE", f"/v1/tuneforge/keys/{created['id']}")
    call(root, "PUT", "/v1/tuneforge/tenants/tenant-b/limits", json={"max_gpus": 4})
    call(a, "POST", "/v1/tuneforge/tenants", json={"name": "nope"})  # 403: refused calls are audited too
    call(httpx.Client(base_url=server.url), "DELETE", f"/v1/files/{file_id}")  # 401: no key
    call(a, "DELETE", f"/v1/files/{file_id}")
    a.get("/v1/files")  # reads are not audited

    records = root.get("/v1/tuneforge/audit", params={"limit": 1000}).json()["data"]
    by_request = {}
    for record in records:
        assert record["request_id"] not in by_request, "one record per call"
        by_request[record["request_id"]] = record
    listed = {k["hint"]: k for k in root.get("/v1/tuneforge/keys").json()["data"]}
    a_key_id = listed[server.keys["tenant-a"][:12]]["id"]
    expected = [
        ("POST /v1/files", file_id, 200, "tenant-a"),
        ("POST /v1/fine_tuning/jobs", job["id"], 200, "tenant-a"),
        ("POST /v1/fine_tuning/jobs/{job_id}/cancel", job["id"], 200, "tenant-a"),
        ("POST /v1/tuneforge/keys", created["id"], 200, "default"),
        ("DELETE /v1/tuneforge/keys/{key_id}", created["id"], 200, "default"),
        ("PUT /v1/tuneforge/tenants/{tenant_id}/limits", "tenant-b", 200, "default"),
        ("POST /v1/tuneforge/tenants", None, 403, "tenant-a"),
        ("DELETE /v1/files/{file_id}", file_id, 401, None),
        ("DELETE /v1/files/{file_id}", file_id, 200, "tenant-a"),
    ]
    assert len(calls) == len(expected)
    for (request_id, response), (action, object_id, status, tenant) in zip(calls, expected):
        record = by_request.get(request_id)
        assert record is not None, f"no audit record for {action}"
        assert (record["action"], record["object_id"], record["status"], record["tenant"]) == \
            (action, object_id, status, tenant), record
        assert response.status_code == status
        assert record["source"] == "127.0.0.1"
        if tenant == "tenant-a":
            assert record["key_id"] == a_key_id
    assert not [r for r in records if r["action"].startswith("GET")]
    # Filters and pagination; the JSONL export holds the same records, oldest first.
    deletes = root.get("/v1/tuneforge/audit", params={"action": "DELETE /v1/files"}).json()["data"]
    assert [r["status"] for r in deletes] == [200, 401]
    first = root.get("/v1/tuneforge/audit", params={"tenant": "tenant-a", "limit": 2}).json()
    second = root.get("/v1/tuneforge/audit", params={"tenant": "tenant-a", "limit": 2, "after": first["last_id"]}).json()
    assert first["has_more"] and {r["id"] for r in first["data"]}.isdisjoint(r["id"] for r in second["data"])
    assert all(r["tenant"] == "tenant-a" for r in first["data"] + second["data"])
    export = root.get("/v1/tuneforge/audit/export")
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    exported = [json.loads(line) for line in export.text.splitlines()]
    assert [r["id"] for r in exported] == [r["id"] for r in reversed(records)]  # reads added none
    # Never a secret or a body: no key, no file content, no request field in any record.
    text = export.text
    for secret in [*server.keys.values(), admin_secret(server), created["key"]]:
        assert secret not in text and secret[12:] not in text
    assert "max_gpus" not in text and "tiny-llama" not in text and "t.jsonl" not in text and "temp" not in text
    # Append-only: the database refuses to change or remove a record.
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    from sqlalchemy import text as sql

    for statement in ("UPDATE audit_log SET status = 200", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            with db.session() as session:
                session.execute(sql(statement))
    db.dispose()
    assert len(root.get("/v1/tuneforge/audit", params={"limit": 1000}).json()["data"]) == len(records)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tuneforge test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_server_speaks_https_with_a_certificate_and_refuses_plain_http(tmp_path):
    import ssl

    home = tmp_path / "home"
    home.mkdir()
    cert, key = self_signed_certificate(tmp_path)
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_DATABASE_URL": f"sqlite:///{home / 'tuneforge.db'}"}
    base = [sys.executable, "-m", "tuneforge.cli", "server", "--no-worker"]
    half = subprocess.run([*base, "--tls-cert", str(cert)], env=env, capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "--tls-key" in half.stderr
    wrong = subprocess.run([*base, "--tls-cert", str(cert), "--tls-key", str(cert)], env=env, capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 2 and "cannot load" in wrong.stderr
    port = free_port()
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen([*base, "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        verify = ssl.create_default_context(cafile=str(cert))
        wait_healthy(f"https://127.0.0.1:{port}", process, verify=verify)
        secret = (home / "admin-key").read_text().strip()
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=verify,
                              headers={"Authorization": f"Bearer {secret}"})
        assert client.get("/v1/models").status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # no plain HTTP on the TLS port
        with pytest.raises(httpx.HTTPError):  # and a client that checks certificates refuses an unknown one
            httpx.get(f"https://127.0.0.1:{port}/health", timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_the_database_token_bucket_is_exact_refusals_cost_nothing_and_it_refills(database_url):
    from tuneforge.db import quotas
    from tuneforge.db.migrate import upgrade

    db = Database(database_url)
    upgrade(db.engine)

    def take(at: float, key: str = "key_a"):
        with db.session() as session:
            return quotas.take_token(session, key_id=key, now_s=at, per_second=2.0, capacity=5)

    assert [take(100.0).allowed for _ in range(5)] == [True] * 5
    refused = [take(100.0) for _ in range(3)]  # refusals do not dig the bucket deeper
    assert [s.allowed for s in refused] == [False] * 3 and all(s.retry_after == pytest.approx(0.5) for s in refused)
    assert take(100.0, key="key_b").allowed  # one bucket per key
    assert take(100.5).allowed and not take(100.5).allowed  # half a second at 2/s: one token back
    assert [take(200.0).allowed for _ in range(6)] == [True] * 5 + [False]  # full again, never above capacity
    assert not take(150.0).allowed  # a clock behind the last update refills nothing
    db.dispose()


def test_the_redis_token_bucket_is_shared_by_limiters_and_answers_retry_after():
    redis = pytest.importorskip("redis")
    from tuneforge.api.errors import ApiError
    from tuneforge.api.rate_limit import RateLimiter, RedisBuckets

    url = os.environ.get("TUNEFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable at {url} ({type(exc).__name__}); set TUNEFORGE_TEST_REDIS_URL")
    key = f"key_test_{os.getpid()}_{time.time_ns()}"
    limiters = [RateLimiter(RedisBuckets(url), default_per_minute=60, burst=5) for _ in range(2)]  # two processes
    for i in range(5):
        limiters[i % 2].check(key, per_minute=None)
    for limiter in limiters:
        with pytest.raises(ApiError) as refused:
            limiter.check(key, per_minute=None)
        assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    time.sleep(1.1)
    limiters[1].check(key, per_minute=None)  # a token came back
    limiters[0].buckets.client.delete(f"tuneforge:rate:{key}")
