"""The human-evaluation round trip through a real `tuneforge server`: a blinded, shuffled export of a job's
evaluation samples (JSONL and CSV), two annotators' verdicts uploaded as CSV and JSONL, win rates and
Cohen's kappa in the report; the key never leaves the server, a bad upload names its lines and imports
nothing, scopes apply and the calls are audited.

The job's evaluation.json is written into its directory as the recipe writes it (spec/jobdir.py
write_report; the recipe's own report is tested in test_evaluation_report_api.py), so no training runs
here. SQLite only: the database part is the tenant-scoped job lookup every job route shares.
"""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

from tuneforge.evaluation.statistics import cohen_kappa
from tuneforge.spec.jobdir import EvaluationReport, SideBySide, write_report

QUEUED = {"training": {"max_steps": 2}}
FINE_TUNED = [f'{{"name": "N{i}", "age": {20 + i}, "city": "C{i}"}}' for i in range(6)]
BASE = [f"Sure! The person is called N{i}." for i in range(6)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One server for the module (each test makes its own job): starting one costs seconds.
    root = tmp_path_factory.mktemp("human-eval")
    (root / "home").mkdir()
    process = ServerProcess(root / "home", f"sqlite:///{root / 'tuneforge.db'}", worker=False)
    yield process
    process.stop()


def http(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def queued_job(a: httpx.Client) -> str:
    file = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])
    job = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"], "tuneforge": QUEUED})
    assert job.status_code == 200, job.text
    return job.json()["id"]


def with_report(server: ServerProcess, job_id: str) -> None:
    job_dir = server.home / "jobs" / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    write_report(job_dir, EvaluationReport(
        dataset="val.jsonl", examples=6, samples=[SideBySide(prompt=f"Text {i}", reference=FINE_TUNED[i], base=BASE[i],
                                                             fine_tuned=FINE_TUNED[i]) for i in range(6)]))


def stored_text(server: ServerProcess, job_id: str, name: str) -> str:
    """DIR/human_eval/NAME as the server reads it: decrypted with the job's key when sealed."""
    from tuneforge.db.session import Database
    from tuneforge.registry.storage import job_files
    from tuneforge.registry.storage.keys import FolderKeyProvider

    path = server.home / "jobs" / job_id / "human_eval" / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    try:
        with db.read_session() as session:
            key = job_files.job_key(session, FolderKeyProvider(server.home / "keys"), tenant_id="tenant-a",
                                    job_id=job_id)
    finally:
        db.dispose()
    return job_files.unseal_bytes(key, f"human_eval/{name}", job_files.sealed_path(path)).decode("utf-8")


def verdict_for_fine_tuned(row: dict) -> str:
    assert {row["left"], row["right"]} == {FINE_TUNED[int(row["prompt"].split()[-1])],
                                           BASE[int(row["prompt"].split()[-1])]}
    return "left" if row["left"] in FINE_TUNED else "right"


def test_export_judge_report_round_trip_keeps_the_key_on_the_server(server):
    a = http(server, server.keys["tenant-a"])
    job_id = queued_job(a)
    with_report(server, job_id)

    created = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval", json={"seed": 3})
    assert created.status_code == 200, created.text
    assert created.json() == {"object": "tuneforge.human_eval", "job_id": job_id, "created_at": created.json()["created_at"],
                              "models": ["fine-tuned", "base"], "rows": 6, "judgements": 0, "annotators": [],
                              "uploads": 0}
    again = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval")
    assert again.status_code == 409 and again.json()["error"]["code"] == "human_eval_exists"

    exported = a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval/rows")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/jsonl")
    rows = [json.loads(line) for line in exported.text.splitlines()]
    assert [r["row_id"] for r in rows] == [f"r{i:04d}" for i in range(1, 7)]
    assert all(set(r) == {"row_id", "prompt", "left", "right"} for r in rows)  # no model names, no key
    assert [r["prompt"] for r in rows] != [f"Text {i}" for i in range(6)]  # shuffled (seed 3)
    sides = [r["left"] in FINE_TUNED for r in rows]
    assert sides.count(True) == 3  # the fine-tuned answer is on the left in half the rows
    sheet = list(csv.DictReader(io.StringIO(a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval/rows",
                                                  params={"format": "csv"}).text)))
    assert [dict(row, annotator=None, verdict=None) for row in sheet] == [dict(r, annotator=None, verdict=None)
                                                                         for r in rows]
    assert all(row["annotator"] == "" and row["verdict"] == "" for row in sheet)

    # Annotator 1 fills the CSV and prefers the fine-tuned answer everywhere; annotator 2 (JSONL) calls row 1 a tie.
    first = [{**row, "annotator": "ann1", "verdict": verdict_for_fine_tuned(row)} for row in sheet]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(sheet[0]))
    writer.writeheader()
    writer.writerows(first)
    uploaded = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval/judgements", content=out.getvalue(),
                      headers={"Content-Type": "text/csv"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["per_model"]["fine-tuned"]["wins"] == 6 and uploaded.json()["agreement"] is None
    second = [{"row_id": r["row_id"], "annotator": "ann2", "verdict": "TIE" if i == 0 else verdict_for_fine_tuned(r)}
              for i, r in enumerate(rows)]
    uploaded = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval/judgements", params={"format": "jsonl"},
                      content="".join(json.dumps(r) + "\n" for r in second))
    assert uploaded.status_code == 200, uploaded.text
    report = uploaded.json()
    assert report == a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval/report").json()
    fine = report["per_model"]["fine-tuned"]
    assert (fine["wins"], fine["ties"], fine["losses"], fine["n"]) == (11, 1, 0, 12)
    assert report["per_model"]["base"]["wins"] == 0 and report["by_row"]["fine-tuned"]["wins"] == 5
    assert fine["win_rate"]["method"] == "wilson" and fine["win_rate"]["low"] < 11 / 12 < fine["win_rate"]["high"]
    labels_1 = [row["verdict"] for row in first]
    labels_2 = [row["verdict"].lower() for row in second]
    assert report["agreement"] == {"method": "cohen", "kappa": pytest.approx(cohen_kappa(labels_1, labels_2)),
                                   "rows": 6, "annotators": 2, "percent_agreement": pytest.approx(5 / 6)}
    assert report["annotators"] == ["ann1", "ann2"] and report["judgements"] == 12

    status = a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval").json()
    assert (status["judgements"], status["uploads"], status["annotators"]) == (12, 2, ["ann1", "ann2"])
    # The key is on the server (sealed at rest: the server's default), and no answer ever showed which side a
    # model was on.
    key = json.loads(stored_text(server, job_id, "key.json"))
    assert set(key["key"]["rows"]) == {r["row_id"] for r in rows}
    for text in (created.text, exported.text, uploaded.text, json.dumps(status)):
        assert '"item"' not in text and not any(row_id in text for row_id in key["key"]["rows"] if text != exported.text)
    assert "fine-tuned" not in exported.text and "base" not in exported.text


def test_bad_uploads_name_their_lines_and_import_nothing(server):
    a = http(server, server.keys["tenant-a"])
    job_id = queued_job(a)
    with_report(server, job_id)
    assert a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval").status_code == 200
    url = f"/v1/fine_tuning/jobs/{job_id}/human_eval/judgements"
    bad = "row_id,annotator,verdict\nr0001,ann1,left\nr0002,ann1,maybe\nr9999,ann1,right\n"
    refused = a.post(url, content=bad, headers={"Content-Type": "text/csv"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_judgements" and error["param"] == "file"
    assert "judgements.csv:3: verdict: expected left, right or tie, found 'maybe'" in error["message"]
    assert "judgements.csv:4: row_id: expected a row_id from the export" in error["message"]
    assert a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval").json()["judgements"] == 0  # nothing imported

    good = "row_id,annotator,verdict\nr0001,ann1,left\n"
    assert a.post(url, content=good, headers={"Content-Type": "text/csv"}).status_code == 200
    twice = a.post(url, content=good, headers={"Content-Type": "text/csv"})
    assert twice.status_code == 400
    assert "judgements.csv:2: annotator: expected one verdict per annotator and row, found a second verdict by ann1 " \
           "on r0001 (imported earlier)" in twice.json()["error"]["message"]
    not_utf8 = a.post(url, content=b"\xff\xfe", params={"format": "jsonl"})
    assert not_utf8.status_code == 400 and "not UTF-8" in not_utf8.json()["error"]["message"]
    assert a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval").json()["judgements"] == 1


def test_without_samples_scopes_and_audit(server):
    a = http(server, server.keys["tenant-a"])
    job_id = queued_job(a)
    # No report yet: 404 in the API's error shape for the report and the human eval; creating one is refused.
    for path in ("/evaluation", "/human_eval", "/human_eval/rows", "/human_eval/report"):
        missing = a.get(f"/v1/fine_tuning/jobs/{job_id}{path}")
        assert missing.status_code == 404, path
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        assert missing.json()["error"]["code"] == "not_found"
    refused = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_evaluation_samples"
    assert not (server.home / "jobs" / job_id / "human_eval").exists()

    with_report(server, job_id)
    reader = http(server, server.cli("keys", "create", "--tenant", "tenant-a", "--scopes", "read").strip())
    denied = reader.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    assert a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval").status_code == 200
    assert reader.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval/rows").status_code == 200
    assert reader.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval/judgements", content="").status_code == 403

    root = http(server, (server.home / "admin-key").read_text().strip())
    records = root.get("/v1/tuneforge/audit", params={"tenant": "tenant-a", "limit": 1000}).json()["data"]
    ours = [(r["action"], r["object_id"], r["status"]) for r in records
            if "human_eval" in r["action"] and r["object_id"] == job_id]
    assert sorted(ours) == sorted([
        ("POST /v1/fine_tuning/jobs/{job_id}/human_eval", job_id, 409),
        ("POST /v1/fine_tuning/jobs/{job_id}/human_eval", job_id, 403),
        ("POST /v1/fine_tuning/jobs/{job_id}/human_eval", job_id, 200),
        ("POST /v1/fine_tuning/jobs/{job_id}/human_eval/judgements", job_id, 403),
    ])
