"""`tuneforge server`: the API, the scheduler and a local worker in one process tree.

The API runs in this process (uvicorn); the scheduler (reaper) and the worker run as child processes
that die with it, and that it restarts, with a backoff, when they die first (api/supervisor.py). When
the database has no live admin key it creates one for the tenant `default`, prints it once and keeps a
copy in $TUNEFORGE_HOME/admin-key (mode 0600), unless TUNEFORGE_ADMIN_KEY names the key to use.
Everything the server tree creates is private to its user (umask 077; the home is 0700). With a
certificate and key (--tls-cert / --tls-key) the API speaks HTTPS only.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from tuneforge.api.supervisor import ChildExit, Supervisor
from tuneforge.db import audit
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.home import make_private, tuneforge_home
from tuneforge.settings import Settings

log = logging.getLogger("tuneforge.server")
ADMIN_TENANT = "default"
CHILD_STOP_SECONDS = 180
SHUTDOWN_GRACE_SECONDS = 5


def bootstrap_admin_key(db: Database) -> str | None:
    """Create an admin key when the database has no live one (a fresh database, or one where only tenant
    keys were made with `tuneforge keys create` before the first start); returns the secret it made."""
    with db.session() as session:
        if tenant_rows.count_api_keys(session, admin_only=True):
            return None
        chosen = os.environ.get("TUNEFORGE_ADMIN_KEY") or None
        try:
            _, secret = tenant_rows.create_api_key(session, tenant_id=ADMIN_TENANT, name="admin (bootstrap)",
                                                   admin=True, secret=chosen)
        except ValueError as exc:  # a typed key whose checksum is wrong would never authenticate
            raise SystemExit(f"TUNEFORGE_ADMIN_KEY: {exc}") from None
    if chosen is None:
        path = admin_key_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        print(f"tuneforge: created the admin key for tenant '{ADMIN_TENANT}' (shown once; a copy is in {path}):\n"
              f"  {secret}", file=sys.stderr, flush=True)
    return secret


def child_commands(*, worker: bool, worker_args: list[str]) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "tuneforge.cli"]
    commands = {"scheduler": [*base, "scheduler"]}
    if worker:
        commands["worker"] = [*base, "worker", *worker_args]
    return commands


def audit_child_exit(db: Database, death: ChildExit) -> None:
    """A server child's death in the audit log, where an operator finds it (action prefix `SERVER`)."""
    with db.session() as session:
        audit.record(session, tenant_id=None, key_id=None, action=f"SERVER restart {death.name}",
                     object_id=death.describe(), status=503, request_id=f"server_{os.getpid()}",
                     source=socket.gethostname())


def serve(*, host: str, port: int, worker: bool, worker_args: list[str], log_level: str = "info",
          tls_cert: Path | None = None, tls_key: Path | None = None, forwarded_allow_ips: str | None = None) -> int:
    """Run the server tree. `forwarded_allow_ips`: the reverse proxies whose X-Forwarded-For / -Proto
    are believed (uvicorn's setting; default 127.0.0.1, or FORWARDED_ALLOW_IPS)."""
    import uvicorn

    from tuneforge.api.app import create_app

    settings = Settings.from_env()
    make_private(settings.database_url)
    db = Database(settings.database_url, pool_size=10)
    upgrade(db.engine)
    bootstrap_admin_key(db)
    children = Supervisor(child_commands(worker=worker, worker_args=worker_args), env=dict(os.environ),
                          on_exit=lambda death: audit_child_exit(db, death))
    children.start()
    app = None
    try:
        app = create_app(settings, db=db)
        # Open event streams would hold a graceful shutdown forever: give connections a few seconds.
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)} if tls_cert else {}
        proxies = {"forwarded_allow_ips": forwarded_allow_ips} if forwarded_allow_ips else {}
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                      timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, **tls, **proxies)).run()
    finally:
        if app is not None:
            app.state.playground.close()  # the playground processes started for /v1/chat/completions
        children.stop(CHILD_STOP_SECONDS)
        db.dispose()
    return 0


def admin_key_path() -> Path:
    return tuneforge_home() / "admin-key"
