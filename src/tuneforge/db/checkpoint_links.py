"""Data access for the object-store links of a job's kept checkpoints (registry/storage/jobs.py
publish_checkpoints): what retention pruning and deleting the model drop, so the collector removes the objects."""

from __future__ import annotations

from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from tuneforge.db.tables import ObjectLink

CHECKPOINT_KIND = "checkpoint"  # ObjectLink.kind of a checkpoint's weights file


def drop_checkpoint_links(session: Session, *, job_id: str, paths: list[str] | None = None) -> int:
    """Drop the job's checkpoint links: all of them, or those under these checkpoint folders (rows' paths)."""
    query = delete(ObjectLink).where(ObjectLink.owner == job_id, ObjectLink.kind == CHECKPOINT_KIND)
    if paths is not None:
        if not paths:
            return 0
        query = query.where(or_(*(ObjectLink.name.startswith(path.rstrip("/") + "/", autoescape=True)
                                  for path in paths)))
    return session.execute(query.execution_options(synchronize_session=False)).rowcount
