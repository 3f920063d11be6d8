"""OpenAI's Uploads API against a real `tuneforge server`, driven by the official `openai` client: a file
sent in parts becomes an ordinary, validated File with the same bytes; the declared size, the MD5 and the
upload's state are enforced; expired uploads' parts are removed by the blob collector."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import openai
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, wait_validated

DATA = (EXAMPLE_DATA / "train.jsonl").read_bytes()


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def clients(server: ServerProcess, tenant: str = "tenant-a") -> tuple[openai.OpenAI, httpx.Client]:
    key = server.keys[tenant]
    return (openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0),
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30))


def thirds(data: bytes) -> list[bytes]:
    cut = len(data) // 3
    return [data[:cut], data[cut:2 * cut], data[2 * cut:]]


def test_a_file_sent_in_parts_becomes_a_validated_file_and_uploads_are_enforced(server):
    client, http = clients(server)
    upload = client.uploads.create(bytes=len(DATA), filename="train.jsonl", mime_type="application/jsonl",
                                   purpose="fine-tune")
    assert upload.status == "pending" and upload.bytes == len(DATA) and upload.expires_at > upload.created_at
    parts = [client.uploads.parts.create(upload.id, data=chunk) for chunk in thirds(DATA)]
    assert all(p.upload_id == upload.id and p.object == "upload.part" for p in parts)

    # A wrong MD5 refuses the completion and stores nothing; the upload stays pending.
    with pytest.raises(openai.BadRequestError, match="MD5"):
        client.uploads.complete(upload.id, part_ids=[p.id for p in parts], md5="0" * 32)
    assert http.get("/v1/files").json()["data"] == []
    # Parts out of order make other bytes: the MD5 tells.
    with pytest.raises(openai.BadRequestError, match="MD5"):
        client.uploads.complete(upload.id, part_ids=[p.id for p in reversed(parts)],
                                md5=hashlib.md5(DATA).hexdigest())

    done = client.uploads.complete(upload.id, part_ids=[p.id for p in parts], md5=hashlib.md5(DATA).hexdigest())
    assert done.status == "completed" and done.file is not None and done.file.bytes == len(DATA)
    assert done.file.filename == "train.jsonl" and done.file.purpose == "fine-tune"
    file = wait_validated(http, done.file.id)
    assert file["status"] == "processed", file
    assert http.get(f"/v1/files/{done.file.id}/content").content == DATA
    assert http.get(f"/v1/files/{done.file.id}/validation").json()["examples"] == DATA.count(b"\n")

    # A completed upload takes nothing more.
    with pytest.raises(openai.BadRequestError, match="completed"):
        client.uploads.parts.create(upload.id, data=b"{}\n")
    with pytest.raises(openai.BadRequestError, match="completed"):
        client.uploads.cancel(upload.id)

    # (One server for both halves: a server start is most of this test's time.)
    enforce_the_declared_size_and_the_upload_state(server, done.file.id)


def enforce_the_declared_size_and_the_upload_state(server, done_file_id: str):
    client, http = clients(server)
    upload = client.uploads.create(bytes=len(DATA), filename="train.jsonl", mime_type="application/jsonl",
                                   purpose="fine-tune")
    first = client.uploads.parts.create(upload.id, data=DATA[:100])
    # A part that passes what the declared size leaves: 413, and nothing of it is kept.
    with pytest.raises(openai.APIStatusError) as refused:
        client.uploads.parts.create(upload.id, data=DATA[100:] + b"x")
    assert refused.value.status_code == 413 and "declared size" in refused.value.message
    # Fewer bytes than declared cannot complete.
    with pytest.raises(openai.BadRequestError, match="declared"):
        client.uploads.complete(upload.id, part_ids=[first.id])
    with pytest.raises(openai.BadRequestError, match="not a part"):
        client.uploads.complete(upload.id, part_ids=[first.id, "part_000000000000000000000000"])
    rest = client.uploads.parts.create(upload.id, data=DATA[100:])
    # Bad requests name their field.
    for body, param in (({"mime_type": "application/x-python-pickle"}, "mime_type"), ({"filename": "../x"}, "filename"),
                        ({"bytes": 0}, "bytes"), ({"bytes": 1 << 60}, "bytes"), ({"purpose": "batch"}, "purpose")):
        response = http.post("/v1/uploads", json={"bytes": 10, "filename": "a.jsonl", "mime_type": "application/jsonl",
                                                  "purpose": "fine-tune", **body})
        assert response.status_code in (400, 413) and response.json()["error"]["param"] == param, response.text
    # Cancelled: no parts, no completion; the other tenant cannot see it at all.
    other, _ = clients(server, "tenant-b")
    with pytest.raises(openai.NotFoundError):
        other.uploads.cancel(upload.id)
    assert client.uploads.cancel(upload.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.uploads.complete(upload.id, part_ids=[first.id, rest.id])
    assert [f["id"] for f in http.get("/v1/files").json()["data"]] == [done_file_id]


def test_expired_uploads_refuse_parts_and_their_blobs_are_collected(tmp_path, database_url):
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db import uploads as upload_rows
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.scheduler.blobs import BlobCollector
    from tuneforge.settings import Settings

    db = Database(database_url)
    upgrade(db.engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    settings = Settings.from_env(database_url=database_url, artifacts_dir=tmp_path / "artifacts", blob_grace_seconds=0)

    def part_blob(content: bytes) -> str:
        writer = store.open_staging(max_bytes=1 << 20)
        writer.write(content)
        staged = writer.finish()
        store.commit(staged)
        writer.discard()
        old = time.time() - 60  # older than any grace period
        os.utime(store.path_of(staged.sha256), (old, old))
        return staged.sha256

    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        live = upload_rows.create_upload(session, tenant_id="t", filename="a.jsonl", purpose="fine-tune",
                                         mime_type="application/jsonl", size=100, expires_in_s=3600)
        dying = upload_rows.create_upload(session, tenant_id="t", filename="b.jsonl", purpose="fine-tune",
                                          mime_type="application/jsonl", size=100, expires_in_s=3600)
        kept, gone = part_blob(b"live part\n"), part_blob(b"expiring part\n")
        assert upload_rows.add_part(session, upload=live, size=10, sha256=kept) is not None
        assert upload_rows.add_part(session, upload=dying, size=14, sha256=gone) is not None
        # Parts never pass the declared size, even one byte.
        assert upload_rows.add_part(session, upload=live, size=91, sha256=kept) is None
        ids = live.id, dying.id
    collector = BlobCollector(db, settings, store)
    counts = collector.run_once()
    assert counts["removed"] == 0 and store.exists(kept) and store.exists(gone)  # both uploads pending

    with db.session() as session:
        dying = upload_rows.get_upload(session, tenant_id="t", upload_id=ids[1])
        dying.expires_at = int(time.time()) - 1
    counts = collector.run_once()
    assert counts["expired uploads"] == 1 and counts["removed"] == 1
    assert store.exists(kept) and not store.exists(gone)
    with db.session() as session:
        assert upload_rows.get_upload(session, tenant_id="t", upload_id=ids[1]).status == "expired"
        assert upload_rows.get_upload(session, tenant_id="t", upload_id=ids[0]).status == "pending"
        assert upload_rows.add_part(session, upload=upload_rows.get_upload(session, tenant_id="t", upload_id=ids[1]),
                                    size=1, sha256=kept) is None
    db.dispose()
