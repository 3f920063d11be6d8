"""A job's human evaluation kept beside its other files, in DIR/human_eval/: the blinded export of the
job's evaluation samples (base vs fine-tuned), the key that un-blinds it, and the judgements imported.

The job directory is server state: the API serves this through /v1/fine_tuning/jobs/{id}/human_eval and
never shows the key. Torch-free (stdlib and numpy), so the API process may use it. Every write goes
through a staging file or directory and a rename, so a failed request leaves nothing half-written, and
judgement uploads take the directory's lock, so concurrent uploads neither lose nor duplicate verdicts.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from tuneforge.data.problems import DataError
from tuneforge.evaluation.human import (
    CSV_COLUMNS,
    HumanReport,
    JudgementsText,
    SideBySideKey,
    export_side_by_side,
    human_report,
    read_judgements,
)
from tuneforge.spec.human_eval import MODELS
from tuneforge.spec.jobdir import EvaluationReport, read_report

DIRECTORY = "human_eval"
KEY_FILE = "key.json"  # the key, the seed and the creation time: never served
ROWS_FILE = "rows.jsonl"  # what annotators get
JUDGEMENTS_FILE = "judgements.json"  # every upload's checked verdicts


class NoSamples(ValueError):
    """The job has no evaluation report, or its report has no side-by-side answers to compare."""


class AlreadyExists(FileExistsError):
    pass


InvalidJudgements = DataError  # an upload with bad lines: its message names each (file:line: field: expected)


def _write_json(path: Path, value) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            json.dump(value, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def create(job_dir: Path, *, seed: int, now: int, report: EvaluationReport | None = None) -> dict:
    """Export the job's evaluation samples blinded and shuffled; AlreadyExists when the job has one. report:
    the job's evaluation report when the caller read it (sealed at rest, the server decrypts it), else read here."""
    if (job_dir / DIRECTORY).exists():
        raise AlreadyExists(str(job_dir / DIRECTORY))
    report = report if report is not None else read_report(job_dir)
    if report is None:
        raise NoSamples("the job has no evaluation report yet (it is written when the job succeeds)")
    samples = [s for s in report.samples if s.base is not None and s.fine_tuned is not None]
    if not samples:
        raise NoSamples("the job's evaluation report has no answers of both the base and the fine-tuned model "
                        "side by side (set evaluation.report_samples above 0 and keep evaluation.eval_before_training)")
    items = [{"prompt": s.prompt} for s in samples]
    rows, key = export_side_by_side(items, {MODELS[0]: [s.fine_tuned for s in samples],
                                            MODELS[1]: [s.base for s in samples]}, seed=seed)
    staging = job_dir / f".{DIRECTORY}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_json(staging / KEY_FILE, {"key": key.to_dict(), "seed": seed, "created_at": now})
        with open(staging / ROWS_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        _write_json(staging / JUDGEMENTS_FILE, {"uploads": 0, "skipped": 0, "judgements": []})
        try:
            os.rename(staging, job_dir / DIRECTORY)  # fails when a concurrent request got there first
        except OSError:
            raise AlreadyExists(str(job_dir / DIRECTORY)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return status(job_dir)


def exists(job_dir: Path) -> bool:
    return (job_dir / DIRECTORY / KEY_FILE).is_file()


def _key(job_dir: Path) -> tuple[SideBySideKey, dict]:
    saved = json.loads((job_dir / DIRECTORY / KEY_FILE).read_text(encoding="utf-8"))
    return SideBySideKey.from_dict(saved["key"]), saved


def _judgements(job_dir: Path) -> dict:
    return json.loads((job_dir / DIRECTORY / JUDGEMENTS_FILE).read_text(encoding="utf-8"))


def status(job_dir: Path) -> dict:
    """What the HumanEval object shows: counts and names, nothing of the key."""
    key, saved = _key(job_dir)
    judged = _judgements(job_dir)
    return {"created_at": saved["created_at"], "models": list(key.models), "rows": len(key.rows),
            "judgements": len(judged["judgements"]), "uploads": judged["uploads"],
            "annotators": sorted({annotator for _, annotator, _ in judged["judgements"]})}


def export_text(job_dir: Path, format: str) -> str:
    """The rows annotators get: JSONL as stored, or CSV with empty annotator and verdict columns."""
    text = (job_dir / DIRECTORY / ROWS_FILE).read_text(encoding="utf-8")
    if format == "jsonl":
        return text
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for line in text.splitlines():
        row = json.loads(line)
        writer.writerow([row.get(column, "") for column in CSV_COLUMNS])
    return buffer.getvalue()


@contextmanager
def _locked(job_dir: Path):
    with open(job_dir / DIRECTORY / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_judgements(job_dir: Path, text: str, *, format: str, name: str) -> HumanReport:
    """Check one upload of verdicts (every problem named by line; then nothing is imported), refuse a
    second verdict by an annotator on a row judged in an earlier upload, and store the rest."""
    key, _ = _key(job_dir)
    with _locked(job_dir):
        judged = _judgements(job_dir)
        earlier = [tuple(j) for j in judged["judgements"]]
        accepted, skipped = read_judgements(JudgementsText(text, name, format), key,
                                            imported=[(row_id, annotator) for row_id, annotator, _ in earlier])
        judged = {"uploads": judged["uploads"] + 1, "skipped": judged["skipped"] + skipped,
                  "judgements": [list(j) for j in earlier + accepted]}
        _write_json(job_dir / DIRECTORY / JUDGEMENTS_FILE, judged)
    return human_report(key, [tuple(j) for j in judged["judgements"]], skipped=judged["skipped"])


def report(job_dir: Path) -> HumanReport:
    key, _ = _key(job_dir)
    judged = _judgements(job_dir)
    return human_report(key, [tuple(j) for j in judged["judgements"]], skipped=judged["skipped"])
