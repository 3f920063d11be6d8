"""A job's human evaluation kept beside its other files, in DIR/human_eval/: the blinded export of the
job's evaluation samples (base vs fine-tuned), the key that un-blinds it, and the judgements imported.

The job directory is server state: the API serves this through /v1/fine_tuning/jobs/{id}/human_eval and
never shows the key. Torch-free (stdlib and numpy), so the API process may use it. Every write goes
through a staging file or directory and a rename, so a failed request leaves nothing half-written, and
judgement uploads take the directory's lock, so concurrent uploads neither lose nor duplicate verdicts.
With encryption at rest (`seal` and the job's key) each file is written sealed, NAME.tfe, in the job files'
envelope (registry/storage/job_files.py: the same key derivation and context as the worker's), since these
are written by requests after the run that sealed the rest of the directory ended. Reads take a plaintext
NAME when there is one (encryption was off when it was written, or sealing it was interrupted), else
decrypt NAME.tfe.
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
from typing import Protocol

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

DIRECTORY = "human_eval"  # registry/storage/job_files.py HUMAN_EVAL_DIR
KEY_FILE = "key.json"  # the key, the seed and the creation time: never served
ROWS_FILE = "rows.jsonl"  # what annotators get
JUDGEMENTS_FILE = "judgements.json"  # every upload's checked verdicts
FILES = (KEY_FILE, ROWS_FILE, JUDGEMENTS_FILE)
LOCK_FILE = ".lock"  # job_files.HUMAN_EVAL_LOCK: `seal-artifacts` takes it too


class FileSealing(Protocol):
    """How the files are sealed at rest: the job's key (registry/storage/job_files.py JobKey), whose envelope
    and naming (NAME.tfe) every sealed job file shares. A file that does not authenticate raises from unseal_bytes."""

    def sealed_path(self, path: Path) -> Path: ...

    def seal_bytes(self, relative: str, data: bytes, out: Path) -> None: ...

    def unseal_bytes(self, relative: str, path: Path) -> bytes: ...

    def seal_file(self, job_dir: Path, path: Path) -> int: ...


class NoSamples(ValueError):
    """The job has no evaluation report, or its report has no side-by-side answers to compare."""


class AlreadyExists(FileExistsError):
    pass


class SealedWithoutKey(FileNotFoundError):
    """A file is sealed at rest and the caller gave no key to open it."""


InvalidJudgements = DataError  # an upload with bad lines: its message names each (file:line: field: expected)


def _read(job_dir: Path, name: str, key: FileSealing | None) -> str:
    """DIR/human_eval/NAME's text: the plaintext file when there is one, else its sealed copy decrypted."""
    path = job_dir / DIRECTORY / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if key is None:
            raise SealedWithoutKey(f"{DIRECTORY}/{name} of job {job_dir.name} is not there in plaintext; "
                                   "if it is sealed at rest, reading it needs the job's key") from None
    return key.unseal_bytes(f"{DIRECTORY}/{name}", key.sealed_path(path)).decode("utf-8")


def _write(folder: Path, name: str, text: str, key: FileSealing | None) -> None:
    """folder/NAME (plaintext; with key, NAME.tfe sealed as DIR/human_eval/NAME: folder may be the staging
    directory of create) through a staging file, fsynced and renamed into place."""
    target = folder / name if key is None else key.sealed_path(folder / name)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if key is None:
            with open(staging, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            key.seal_bytes(f"{DIRECTORY}/{name}", text.encode("utf-8"), staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _write_json(folder: Path, name: str, value, key: FileSealing | None) -> None:
    _write(folder, name, json.dumps(value, ensure_ascii=False), key)


def create(job_dir: Path, *, seed: int, now: int, report: EvaluationReport | None = None,
           key: FileSealing | None = None) -> dict:
    """Export the job's evaluation samples blinded and shuffled; AlreadyExists when the job has one. report:
    the job's evaluation report when the caller read it (sealed at rest, the server decrypts it), else read here.
    key: the job's key when encryption at rest is on (every file is written sealed), else None (plaintext)."""
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
    rows, blinding = export_side_by_side(items, {MODELS[0]: [s.fine_tuned for s in samples],
                                                 MODELS[1]: [s.base for s in samples]}, seed=seed)
    staging = job_dir / f".{DIRECTORY}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_json(staging, KEY_FILE, {"key": blinding.to_dict(), "seed": seed, "created_at": now}, key)
        _write(staging, ROWS_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), key)
        _write_json(staging, JUDGEMENTS_FILE, {"uploads": 0, "skipped": 0, "judgements": []}, key)
        try:
            os.rename(staging, job_dir / DIRECTORY)  # fails when a concurrent request got there first
        except OSError:
            raise AlreadyExists(str(job_dir / DIRECTORY)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return status(job_dir, key=key)


def exists(job_dir: Path, key: FileSealing | None = None) -> bool:
    path = job_dir / DIRECTORY / KEY_FILE
    return path.is_file() or (key is not None and key.sealed_path(path).is_file())


def _key(job_dir: Path, key: FileSealing | None) -> tuple[SideBySideKey, dict]:
    saved = json.loads(_read(job_dir, KEY_FILE, key))
    return SideBySideKey.from_dict(saved["key"]), saved


def _judgements(job_dir: Path, key: FileSealing | None) -> dict:
    return json.loads(_read(job_dir, JUDGEMENTS_FILE, key))


def status(job_dir: Path, *, key: FileSealing | None = None) -> dict:
    """What the HumanEval object shows: counts and names, nothing of the key."""
    blinding, saved = _key(job_dir, key)
    judged = _judgements(job_dir, key)
    return {"created_at": saved["created_at"], "models": list(blinding.models), "rows": len(blinding.rows),
            "judgements": len(judged["judgements"]), "uploads": judged["uploads"],
            "annotators": sorted({annotator for _, annotator, _ in judged["judgements"]})}


def export_text(job_dir: Path, format: str, *, key: FileSealing | None = None) -> str:
    """The rows annotators get: JSONL as stored, or CSV with empty annotator and verdict columns."""
    text = _read(job_dir, ROWS_FILE, key)
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
    with open(job_dir / DIRECTORY / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_judgements(job_dir: Path, text: str, *, format: str, name: str, key: FileSealing | None = None,
                   seal: bool = False) -> HumanReport:
    """Check one upload of verdicts (every problem named by line; then nothing is imported), refuse a
    second verdict by an annotator on a row judged in an earlier upload, and store the rest. seal (with the
    job's key): store them sealed, sealing first what an older request left plaintext."""
    if seal and key is None:
        raise ValueError("sealing the judgements needs the job's key")
    blinding, _ = _key(job_dir, key)
    with _locked(job_dir):
        if seal:
            _seal_plaintext(job_dir, key)
        judged = _judgements(job_dir, key)
        earlier = [tuple(j) for j in judged["judgements"]]
        accepted, skipped = read_judgements(JudgementsText(text, name, format), blinding,
                                            imported=[(row_id, annotator) for row_id, annotator, _ in earlier])
        judged = {"uploads": judged["uploads"] + 1, "skipped": judged["skipped"] + skipped,
                  "judgements": [list(j) for j in earlier + accepted]}
        _write_json(job_dir / DIRECTORY, JUDGEMENTS_FILE, judged, key if seal else None)
    return human_report(blinding, [tuple(j) for j in judged["judgements"]], skipped=judged["skipped"])


def report(job_dir: Path, *, key: FileSealing | None = None) -> HumanReport:
    blinding, _ = _key(job_dir, key)
    judged = _judgements(job_dir, key)
    return human_report(blinding, [tuple(j) for j in judged["judgements"]], skipped=judged["skipped"])


def _seal_plaintext(job_dir: Path, key: FileSealing) -> None:
    """Seal what an older request left plaintext (encryption at rest was off, or not there yet); the caller holds
    the lock. A plaintext file beside a sealed copy replaces it: the plaintext is what readers take."""
    for name in FILES:
        if (job_dir / DIRECTORY / name).is_file():
            key.seal_file(job_dir, job_dir / DIRECTORY / name)
