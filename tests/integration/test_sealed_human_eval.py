"""A job's human evaluation sealed at rest (DIR/human_eval/, written by API requests after the run ended) and
`tuneforge storage seal-artifacts` sealing the directories of jobs that ended before sealing existed: what is
on disk is ciphertext, the API round trip reads it decrypted, concurrent judgement uploads stay exact, a
shredded tenant answers 410, and after sealing an old plaintext job directory every reader still works.

Job rows and directories are built directly (the report as the recipe writes it), the API runs in this
process (TestClient), SQLite only: no training run is needed for any of this.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_sealed_artifacts import Platform, files_containing

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.evaluation import human_store
from tuneforge.registry.storage import job_files
from tuneforge.registry.storage.reseal import ENDED_JOB_PARTS
from tuneforge.spec.jobdir import EvaluationReport, SideBySide, write_report

FINE_TUNED = [f'{{"name": "FTANSWER{i}", "age": {20 + i}}}' for i in range(6)]
BASE = [f"BASEANSWER{i}: the person is called N{i}." for i in range(6)]
PROMPTS = [f"PROMPTTEXT {i}" for i in range(6)]


@pytest.fixture
def platform(tuneforge_home):
    made = Platform(tuneforge_home)
    yield made
    made.close()


def job_row(platform: Platform, status: str, tenant: str = "tenant-a") -> tuple[str, Path]:
    """A job of tenant in status, on a real file row; returns its id and its (empty) directory."""
    from tuneforge.spec import validate_job_spec

    with platform.db.session() as session:
        file = file_rows.create_file(session, tenant_id=tenant, filename="train.jsonl", purpose="fine-tune", size=10,
                                     sha256="ab" * 32, report={}, status="processed", status_details=None)
        job = job_rows.create_job(session, tenant_id=tenant, spec=validate_job_spec({"dataset": {"path": file.id}}),
                                  model="tiny-llama", training_file=file.id, validation_file=None, suffix=None,
                                  metadata=None)
        job.status = status
        job_id = job.id
    job_dir = platform.settings.jobs_dir / job_id
    job_dir.mkdir(parents=True)
    return job_id, job_dir


def samples() -> EvaluationReport:
    return EvaluationReport(dataset="val.jsonl", examples=6, samples=[
        SideBySide(prompt=PROMPTS[i], reference=FINE_TUNED[i], base=BASE[i], fine_tuned=FINE_TUNED[i])
        for i in range(6)])


def verdicts(rows: list[dict], annotator: str) -> str:
    """annotator prefers the fine-tuned answer on every row, as JSONL."""
    return "".join(json.dumps({"row_id": r["row_id"], "annotator": annotator,
                               "verdict": "left" if r["left"] in FINE_TUNED else "right"}) + "\n" for r in rows)


def in_clear(folder: Path) -> list[Path]:
    return sorted({path for text in FINE_TUNED + BASE + PROMPTS + ["ann1", "r0001"]
                   for path in files_containing(folder, text.encode())})


def test_a_human_evaluation_is_written_sealed_and_read_back_through_the_api(platform):
    job_id, job_dir = job_row(platform, "succeeded")
    write_report(job_dir, samples())
    job_files.seal_job_dir(platform.db, platform.store.keys, tenant_id="tenant-a", job_id=job_id, job_dir=job_dir)
    http, url = platform.http(), f"/v1/fine_tuning/jobs/{job_id}/human_eval"

    created = http.post(url, json={"seed": 3})
    assert created.status_code == 200, created.text
    assert (created.json()["rows"], created.json()["judgements"]) == (6, 0)
    rows = [json.loads(line) for line in http.get(f"{url}/rows").text.splitlines()]
    assert sorted(r["prompt"] for r in rows) == PROMPTS
    uploaded = http.post(f"{url}/judgements", content=verdicts(rows, "ann1"), params={"format": "jsonl"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["per_model"]["fine-tuned"]["wins"] == 6
    assert http.get(f"{url}/report").json() == uploaded.json()
    assert http.get(url).json()["annotators"] == ["ann1"]

    # On disk: the three files sealed (NAME.tfe, envelope magic), the empty lock; nothing quotes a sample or a verdict.
    stored = job_dir / "human_eval"
    assert sorted(p.name for p in stored.iterdir()) == [".lock", "judgements.json.tfe", "key.json.tfe",
                                                        "rows.jsonl.tfe"]
    assert all(p.read_bytes()[:4] == b"TFE1" for p in stored.glob("*.tfe"))
    assert in_clear(job_dir) == [] and not list(job_dir.glob(".human_eval.tmp-*"))

    # A sealed file changed on disk is refused, not served; a shredded tenant's evaluation is gone (410).
    judged = stored / "judgements.json.tfe"
    good = judged.read_bytes()
    judged.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    damaged = http.get(f"{url}/report")
    assert damaged.status_code == 500 and damaged.json()["error"]["code"] == "artifact_damaged"
    judged.write_bytes(good)
    platform.tenant_keys().shred("tenant-a")
    for path in ("", "/rows", "/report"):
        gone = http.get(f"{url}{path}")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "content_shredded", path
        assert "/" not in gone.json()["error"]["message"].replace("/v1", "")
    refused = http.post(f"{url}/judgements", content=verdicts(rows, "ann2"), params={"format": "jsonl"})
    assert refused.status_code == 410 and judged.read_bytes() == good  # nothing written


def test_concurrent_sealed_judgement_uploads_neither_lose_nor_duplicate_verdicts(platform):
    job_id, job_dir = job_row(platform, "succeeded")
    with platform.db.session() as session:
        key = job_files.job_key(session, platform.store.keys, tenant_id="tenant-a", job_id=job_id, create=True)
    human_store.create(job_dir, seed=1, now=0, report=samples(), key=key)
    rows = [json.loads(line) for line in human_store.export_text(job_dir, "jsonl", key=key).splitlines()]
    annotators = [f"ann{n}" for n in range(8)]

    def upload(annotator: str) -> bool:
        try:
            human_store.add_judgements(job_dir, verdicts(rows, annotator), format="jsonl", name="j.jsonl", key=key,
                                       seal=True)
            return True
        except human_store.InvalidJudgements:  # the same annotator's second upload: every row judged already
            return False

    with ThreadPoolExecutor(8) as pool:  # each annotator's upload sent twice at once
        accepted = list(pool.map(upload, [a for a in annotators for _ in range(2)]))
    assert accepted.count(True) == 8
    status = human_store.status(job_dir, key=key)
    assert (status["judgements"], status["uploads"], status["annotators"]) == (48, 8, annotators)
    assert human_store.report(job_dir, key=key).to_dict()["per_model"]["fine-tuned"]["wins"] == 48
    assert in_clear(job_dir) == []


def old_plaintext_job(platform: Platform, status: str) -> tuple[str, Path]:
    """A job directory as an install from before sealing left it: report, adapter, export, checkpoint and a
    human evaluation with a judgement, all plaintext."""
    job_id, job_dir = job_row(platform, status)
    write_report(job_dir, samples())
    (job_dir / "adapter").mkdir()
    (job_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"ADAPTERWEIGHTS" * 100)
    (job_dir / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (job_dir / "export").mkdir()
    (job_dir / "export" / "model.gguf").write_bytes(b"EXPORTBYTES" * 10)
    (job_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (job_dir / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"CHECKPOINTBYTES")
    human_store.create(job_dir, seed=5, now=0, report=samples())
    rows = [json.loads(line) for line in human_store.export_text(job_dir, "jsonl").splitlines()]
    human_store.add_judgements(job_dir, verdicts(rows[:3], "ann1"), format="jsonl", name="j.jsonl")
    return job_id, job_dir


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_seal_artifacts_seals_ended_jobs_directories_and_every_reader_still_works(platform, capsys, tmp_path):
    from tuneforge.cli import main

    old_id, old_dir = old_plaintext_job(platform, "succeeded")
    active_id, active_dir = old_plaintext_job(platform, "running")
    http = platform.http()
    before = {path: http.get(f"/v1/fine_tuning/jobs/{old_id}{path}") for path in
              ("/evaluation", "/human_eval/rows", "/human_eval/report")}
    assert all(r.status_code == 200 for r in before.values()), {p: r.text for p, r in before.items()}
    assert human_store.exists(old_dir) and (old_dir / "human_eval" / "key.json").is_file()
    # A crash in the middle of an earlier sealing: one file sealed beside its plaintext, one sealed copy half-written.
    with platform.db.session() as session:
        key = job_files.job_key(session, platform.store.keys, tenant_id="tenant-a", job_id=old_id, create=True)
    config = old_dir / "adapter" / "adapter_config.json"
    job_files.seal_bytes(key, "adapter/adapter_config.json", config.read_bytes(), job_files.sealed_path(config))
    (old_dir / "adapter" / "adapter_model.safetensors.tfe.partial").write_bytes(b"half")

    assert main(["storage", "seal-artifacts"]) == 0
    said = capsys.readouterr().err
    assert "sealed 8 plaintext files" in said and "in 1 ended jobs' directories" in said, said
    assert f"skipped {active_id} (running: it may still run" in said and "removed 1 half-written leftovers" in said

    # Every part sealed, named as the worker names them; no plaintext and no leftover; the running job untouched.
    assert job_files.plaintext_files(old_dir, ENDED_JOB_PARTS) == []
    assert not list(old_dir.rglob("*.partial")) and in_clear(old_dir) == []
    assert files_containing(old_dir, b"ADAPTERWEIGHTS") == files_containing(old_dir, b"EXPORTBYTES") == []
    assert sorted(p.name for p in (old_dir / "human_eval").iterdir()) == [".lock", "judgements.json.tfe",
                                                                        "key.json.tfe", "rows.jsonl.tfe"]
    assert (old_dir / "evaluation.json.tfe").is_file() and (old_dir / "adapter" / "adapter_config.json.tfe").is_file()
    assert len(job_files.plaintext_files(active_dir, ENDED_JOB_PARTS)) == 8

    # The readers: the evaluation report and the human evaluation through the API, a new (sealed) judgement, the
    # adapter as another job reads it.
    for path, response in before.items():
        after = http.get(f"/v1/fine_tuning/jobs/{old_id}{path}")
        assert after.status_code == 200 and after.content == response.content, path
    rows = [json.loads(line) for line in before["/human_eval/rows"].text.splitlines()]
    added = http.post(f"/v1/fine_tuning/jobs/{old_id}/human_eval/judgements", content=verdicts(rows, "ann2"),
                      params={"format": "jsonl"})
    assert added.status_code == 200 and added.json()["judgements"] == 9, added.text
    assert in_clear(old_dir) == []
    adapter = job_files.plaintext_folder(platform.db, platform.store.keys, tenant_id="tenant-a", job_id=old_id,
                                         job_dir=old_dir, part="adapter", dest=tmp_path / "reader")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"ADAPTERWEIGHTS" * 100
    assert (adapter / "adapter_config.json").read_text() == '{"peft_type": "LORA", "r": 4}'

    # Again: nothing to seal, nothing rewritten.
    sealed = digests(old_dir)
    assert main(["storage", "seal-artifacts", "--tenant", "tenant-a"]) == 0
    said = capsys.readouterr().err
    assert "sealed 0 plaintext files (0.0 MB) in 0 ended jobs' directories; 1 ended jobs had nothing" in said, said
    assert digests(old_dir) == sealed


def test_a_human_evaluation_left_plaintext_is_sealed_by_the_next_upload(platform):
    # Written while encryption at rest was off (or before it existed): the next upload seals it, then writes sealed.
    job_id, job_dir = job_row(platform, "failed")
    human_store.create(job_dir, seed=2, now=0, report=samples())
    rows = [json.loads(line) for line in human_store.export_text(job_dir, "jsonl").splitlines()]
    url = f"/v1/fine_tuning/jobs/{job_id}/human_eval"
    uploaded = platform.http().post(f"{url}/judgements", content=verdicts(rows, "ann1"), params={"format": "jsonl"})
    assert uploaded.status_code == 200 and uploaded.json()["judgements"] == 6, uploaded.text
    assert in_clear(job_dir) == [] and job_files.plaintext_files(job_dir, ("human_eval",)) == []
    assert platform.http().get(url).json()["judgements"] == 6


def test_seal_artifacts_and_judgement_uploads_take_the_same_lock():
    # human_store imports nothing of the registry (layering), so both name the folder and its lock.
    assert (human_store.DIRECTORY, human_store.LOCK_FILE) == (job_files.HUMAN_EVAL_DIR, job_files.HUMAN_EVAL_LOCK)
