"""Probes: `/healthz` answers while the process serves requests (liveness); `/readyz` answers 200 only when
the database is reachable and its schema is at the newest migration (readiness: a load balancer sends
no traffic to a process whose database is down or not yet migrated). Neither needs a key."""

from __future__ import annotations

import functools

from alembic.script import ScriptDirectory
from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from tuneforge.api.dependencies import Db
from tuneforge.api.errors import ApiError
from tuneforge.db.migrate import MIGRATIONS_DIR, current_revision

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
def readyz(db: Db) -> dict:
    head = migration_head()
    try:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        current = current_revision(db.engine)
    except SQLAlchemyError as exc:
        raise ApiError(503, f"the database is not reachable: {type(exc).__name__}", code="database_unavailable",
                       type="server_error") from None
    if current != head:
        raise ApiError(503, f"the database schema is at migration {current or 'none'}, this server needs {head}: "
                       "run `tuneforge server` (it migrates at start) or `tuneforge db upgrade`",
                       code="migrations_pending", type="server_error")
    return {"status": "ready", "database": "ok", "migration": current}


@functools.cache
def migration_head() -> str:
    """The newest migration this code ships (read once per process)."""
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
