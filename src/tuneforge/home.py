"""Where tuneforge keeps its state: TUNEFORGE_HOME (default ~/.tuneforge).

It holds the model cache, job directories, the SQLite database and the artifact store. Every command
reads it through these functions, so tests and users can isolate runs by setting one variable. The
control plane keeps it private to its user: other accounts on the machine must not read tenants' data.
"""

from __future__ import annotations

import os
from pathlib import Path


def tuneforge_home() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".tuneforge").expanduser()


def models_dir() -> Path:
    return tuneforge_home() / "models"


def jobs_dir() -> Path:
    return tuneforge_home() / "jobs"


def make_private(database_url: str | None = None) -> Path:
    """Files this process creates from now on are private to its user (umask 077), the home is 0700,
    and an SQLite database (with its WAL and shared-memory files) is 0600, also one made before."""
    os.umask(0o077)
    home = tuneforge_home()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    if database_url and database_url.startswith("sqlite:///"):
        database = Path(database_url[len("sqlite:///"):])
        for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
            if path.is_file():
                path.chmod(0o600)
    return home
