"""Database engines and sessions: SQLite (WAL) as the embedded default, PostgreSQL via TUNEFORGE_DATABASE_URL.

SQLite transactions begin IMMEDIATE (they take the write lock up front), so a read-then-write such as
a job claim is atomic without SELECT ... FOR UPDATE, and never fails half-way on a lock upgrade.
`Database.read_session()` is for reads only: on SQLite it begins DEFERRED and never holds the write lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "tuneforge_read_only"  # execution option of read sessions


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 here (the only PostgreSQL driver tuneforge installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(normalize_url(engine_or_url))
    return url.get_backend_name() == "sqlite"


def create_db_engine(url: str, *, pool_size: int = 5) -> Engine:
    url = normalize_url(url)
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_immediate_transactions(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=True)


def _sqlite_immediate_transactions(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event own the transaction instead of pysqlite's implicit BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


class Database:
    """An engine and its session factory; `with db.session() as s:` commits on success, rolls back on error."""

    def __init__(self, url: str, *, pool_size: int = 5):
        self.url = normalize_url(url)
        self.engine = create_db_engine(self.url, pool_size=pool_size)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session that only reads: it never takes SQLite's write lock, and anything it writes is rolled back."""
        session = self._read_sessions()
        try:
            yield session
        finally:
            session.close()  # ends the transaction (rolled back) and keeps loaded objects readable

    def dispose(self) -> None:
        self.engine.dispose()
