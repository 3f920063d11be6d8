"""Checkpoint retention once a job has succeeded: keep the best checkpoint and the newest
checkpoint.keep_last, remove the rest (the runtime also kept the one it resumed from, which only a
running job needs), and forget the rows of checkpoints whose folders the runtime already pruned.

What stays is listed by /v1/models as ft:...:ckpt-step-N; deleting the model removes those too. With an object
store, the worker publishes what stays (kept_checkpoints) before the job succeeds; what retention removes loses
its links there (and the collector its objects).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.checkpoint_links import drop_checkpoint_links
from tuneforge.db.tables import JobCheckpoint

log = logging.getLogger("tuneforge.registry.retention")


def retained_steps(steps: list[int], *, keep_last: int, best_step: int | None) -> set[int]:
    """The steps the policy keeps: the newest keep_last, and the best."""
    kept = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    return kept | ({best_step} if best_step in steps else set())


def _present(session: Session, *, job_id: str, job_dir: Path) -> tuple[list[JobCheckpoint], list[JobCheckpoint]]:
    """The job's checkpoint rows whose folders are in its directory, and those the runtime pruned while training."""
    rows = list(session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)))
    root = job_dir.resolve()
    present, pruned = [], []
    for row in rows:
        folder = (job_dir / row.path).resolve()
        ok = row.path and folder.is_relative_to(root) and folder != root and folder.is_dir()
        (present if ok else pruned).append(row)
    return present, pruned


def kept_checkpoints(session: Session, *, job_id: str, job_dir: Path, keep_last: int,
                     best_step: int | None) -> list[JobCheckpoint]:
    """The checkpoints apply_retention will keep (it removes nothing here), oldest first."""
    present, _ = _present(session, job_id=job_id, job_dir=job_dir)
    keep = retained_steps([row.step for row in present], keep_last=keep_last, best_step=best_step)
    return sorted((row for row in present if row.step in keep), key=lambda row: row.step)


def apply_retention(session: Session, *, job_id: str, job_dir: Path, keep_last: int, best_step: int | None) -> list[int]:
    """Remove the checkpoints of a succeeded job that the policy does not keep; returns their steps. Their
    links in the object store go in the same transaction."""
    present, pruned = _present(session, job_id=job_id, job_dir=job_dir)
    for row in pruned:
        session.delete(row)  # pruned by the runtime while training
    keep = retained_steps([row.step for row in present], keep_last=keep_last, best_step=best_step)
    removed, gone = [], [row.path for row in pruned if row.path]
    for row in present:
        if row.step in keep:
            continue
        shutil.rmtree(job_dir / row.path, ignore_errors=True)
        session.delete(row)
        removed.append(row.step)
        gone.append(row.path)
    drop_checkpoint_links(session, job_id=job_id, paths=gone)
    if removed:
        log.info("job %s: removed checkpoints of steps %s (retention: best and newest %d)", job_id, removed, keep_last)
    return sorted(removed)
