"""`tuneforge server`: the API, the scheduler and a local worker in one process tree.

The API runs in this process (uvicorn); the scheduler (reaper) and the worker run as child processes
that die with it. When the database has no live admin key it creates one for the tenant `default`, prints it once and
keeps a copy in $TUNEFORGE_HOME/admin-key (mode 0600), unless TUNEFORGE_ADMIN_KEY names the key to use.
Everything the server tree creates is private to its user (umask 077; the home is 0700). With a
certificate and key (--tls-cert / --tls-key) the API speaks HTTPS only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.home import make_private, tuneforge_home
from tuneforge.scheduler.executors.process import spawn
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


def child_commands(*, worker: bool, worker_args: list[str]) -> list[list[str]]:
    base = [sys.executable, "-m", "tuneforge.cli"]
    commands = [[*base, "scheduler"]]
    if worker:
        commands.append([*base, "worker", *worker_args])
    return commands


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
    children = [spawn(command, env=dict(os.environ)) for command in child_commands(worker=worker, worker_args=worker_args)]
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
        _stop_children(children)
        db.dispose()
    return 0


def _stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + CHILD_STOP_SECONDS
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def admin_key_path() -> Path:
    return tuneforge_home() / "admin-key"
