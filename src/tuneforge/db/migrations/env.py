"""Alembic environment: runs migrations on the engine handed over by db/migrate.py (online mode only)."""

from __future__ import annotations

from alembic import context

from tuneforge.db.tables import Base

MIGRATION_LOCK_ID = 727_001  # pg_advisory_xact_lock key: one migrating process at a time


def _not_optunas(obj, name, type_, reflected, compare_to) -> bool:
    """Autogenerate's filter: Optuna's tables (created by 0010 from Optuna's models) are not in our metadata."""
    from optuna.storages._rdb import models

    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    return table not in models.BaseModel.metadata.tables


def run_migrations_online() -> None:
    engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, include_object=_not_optunas,
                          render_as_batch=engine.dialect.name == "sqlite")
        with context.begin_transaction():
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            context.run_migrations()


run_migrations_online()
