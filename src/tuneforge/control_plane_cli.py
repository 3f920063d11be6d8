"""The control plane's commands: server, worker, scheduler, keys, tenants, db, simulate.

cli.py registers them with one call; each handler imports what it needs when it runs, so `tuneforge
--help` stays fast and none of these processes imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _database():
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.home import make_private
    from tuneforge.settings import Settings

    settings = Settings.from_env()
    make_private(settings.database_url)
    db = Database(settings.database_url)
    upgrade(db.engine)
    return settings, db


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("executor", "gpus", "gpu_type", "cpu_slots"):
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def cmd_server(args: argparse.Namespace) -> int:
    import ssl

    from tuneforge.api.server import serve
    from tuneforge.spec.jobdir import EXIT_BAD_INPUT

    # Refused here, with the files named, rather than as a traceback from inside uvicorn.
    problem = None
    if bool(args.tls_cert) != bool(args.tls_key):
        problem = "--tls-cert and --tls-key go together: give both (a PEM certificate chain and its private key)"
    elif args.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            problem = f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: cannot load them ({exc})"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging()
    return serve(host=args.host, port=args.port, worker=not args.no_worker, worker_args=_worker_args(args),
                 tls_cert=args.tls_cert, tls_key=args.tls_key, forwarded_allow_ips=args.forwarded_allow_ips)


def cmd_worker(args: argparse.Namespace) -> int:
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    _setup_logging()
    settings, db = _database()
    kind = args.executor or settings.executor
    options: dict = {}
    if kind == "local":
        options = {"gpus": args.gpus, "gpu_type": args.gpu_type, "cpu_slots": args.cpu_slots}
    elif kind == "ray":
        options = {"address": settings.ray_address, "gpu_type": args.gpu_type}
    else:
        options = {"settings": settings}
    worker = Worker(db, settings, build_executor(kind, **options), worker_id=args.id)
    logging.getLogger("tuneforge.worker").info(
        "worker %s (%s executor) serving %s", worker.worker_id, kind,
        ", ".join(f"{n.gpus} x {n.gpu_type}" for n in worker.nodes),
    )
    worker.run()
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    import threading

    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.scheduler.blobs import BlobCollector
    from tuneforge.scheduler.loop import run_loops, stop_on_signals
    from tuneforge.scheduler.reaper import Reaper
    from tuneforge.scheduler.sweeps import SweepDriver
    from tuneforge.scheduler.upload_validation import UploadValidator

    _setup_logging()
    settings, db = _database()
    store = LocalArtifactStore.from_settings(settings)  # opens (and seals) tenant uploads
    stop = threading.Event()
    stop_on_signals(stop)
    # The collector's first pass, at once, sweeps the staging folders of uploads that died with a server.
    run_loops([Reaper(db, settings), UploadValidator(db, settings, store, stop=stop), BlobCollector(db, settings, store),
               SweepDriver(db, settings)],  # hyperparameter sweeps: trials are jobs (scheduler/sweeps.py)
              stop=stop)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import time

    from tuneforge.cli import UserError
    from tuneforge.db import tenants as tenant_rows

    _, db = _database()
    with db.session() as session:
        if args.action == "create":
            if not args.tenant:
                raise UserError("keys create needs --tenant NAME")
            _check_tenant_name(args.tenant)
            scopes = tuple(s for s in (args.scopes or "").replace(",", " ").split()) or None
            expires_at = int(time.time()) + args.expires_in if args.expires_in else None
            try:
                key, secret = tenant_rows.create_api_key(session, tenant_id=args.tenant, name=args.name or "",
                                                         admin=args.admin, scopes=scopes, expires_at=expires_at)
            except ValueError as exc:
                raise UserError(f"--scopes: {exc}") from None
            print(secret)
            print(f"created {key.id} for tenant {key.tenant_id} (scopes: {key.scopes}); "
                  "the key is shown only this once", file=sys.stderr)
        elif args.action == "list":
            for key in tenant_rows.list_api_keys(session, tenant_id=args.tenant):
                expired = key.expires_at is not None and key.expires_at <= time.time()
                state = "revoked" if key.revoked_at else "expired" if expired else "active"
                print(f"{key.id}\t{key.tenant_id}\t{state}\t{key.scopes.replace(' ', ',')}\t{key.hint or '-'}\t{key.name}")
        else:
            if not args.key_id or not tenant_rows.revoke_api_key(session, key_id=args.key_id):
                raise UserError(f"no active key {args.key_id!r} (tuneforge keys list shows them)")
            print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def _check_tenant_name(name: str) -> None:
    import re

    from tuneforge.cli import UserError

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
        raise UserError(f"tenant {name!r}: expected lowercase letters, digits and dashes (at most 63), e.g. acme-research")


def cmd_tenants(args: argparse.Namespace) -> int:
    from tuneforge.db import tenants as tenant_rows

    _check_tenant_name(args.tenant)
    _, db = _database()
    with db.session() as session:
        tenant = tenant_rows.set_tenant_limits(session, tenant_id=args.tenant, max_running_jobs=args.max_running_jobs,
                                               max_gpus=args.max_gpus, weight=args.weight,
                                               max_active_jobs=args.max_active_jobs,
                                               max_storage_bytes=args.max_storage_bytes,
                                               requests_per_minute=args.requests_per_minute)
        print(f"{tenant.id}: max_running_jobs={tenant.max_running_jobs} max_gpus={tenant.max_gpus} weight={tenant.weight} "
              f"max_active_jobs={tenant.max_active_jobs} max_storage_bytes={tenant.max_storage_bytes} "
              f"requests_per_minute={tenant.requests_per_minute}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from tuneforge.db.migrate import current_revision

    _, db = _database()
    print(f"database at revision {current_revision(db.engine)}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from tuneforge.scheduler.simulation import Cluster, format_report, month_of_jobs, simulate

    jobs = month_of_jobs(count=args.jobs, days=args.days, tenants=args.tenants, seed=args.seed)
    cluster = Cluster.of(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_type=args.gpu_type)
    result = simulate(jobs, cluster, reserve_after_s=args.reserve_after_hours * 3600)
    print(format_report(result, cluster, price_per_gpu_hour=args.price))
    return 0


def add_control_plane_commands(commands) -> None:
    server = commands.add_parser("server", help="run the API with a scheduler and a local worker",
                                 description="Serve the OpenAI-compatible fine-tuning API on HOST:PORT, with the "
                                 "scheduler and (unless --no-worker) a local worker as child processes.")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--no-worker", action="store_true", help="run no worker here (workers join with `tuneforge worker`)")
    server.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    server.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    server.add_argument("--forwarded-allow-ips",
                        help="reverse proxies whose X-Forwarded-For/-Proto headers are trusted, comma-separated "
                        "(default 127.0.0.1); the audit log records the client address they report")
    _worker_options(server)
    server.set_defaults(handler=cmd_server)

    worker = commands.add_parser("worker", help="run a worker against the shared database",
                                 description="Claim queued jobs that fit this worker's GPUs and run them.")
    worker.add_argument("--id", help="worker id (default: HOST-PID-RANDOM)")
    _worker_options(worker)
    worker.set_defaults(handler=cmd_worker)

    scheduler = commands.add_parser("scheduler", help="validate uploads, re-queue jobs whose worker died, collect unused blobs, "
                                    "drive sweeps",
                                    description="The scheduler's loops: the upload validator, the reaper, the blob collector "
                                    "and the sweep driver.")
    scheduler.set_defaults(handler=cmd_scheduler)

    keys = commands.add_parser("keys", help="create, list or revoke API keys",
                               description="API keys are stored hashed and shown once, when created.")
    keys.add_argument("action", choices=("create", "list", "revoke"))
    keys.add_argument("key_id", nargs="?", help="the key to revoke")
    keys.add_argument("--tenant", help="tenant (organization / project) the key belongs to")
    keys.add_argument("--name", help="a note to tell keys apart")
    keys.add_argument("--admin", action="store_true", help="add the admin scope: keys, tenants, limits, the audit log")
    keys.add_argument("--scopes", help="comma-separated, of read,jobs,files,admin (default read,jobs,files)")
    keys.add_argument("--expires-in", type=int, metavar="SECONDS", help="the key stops working after this long")
    keys.set_defaults(handler=cmd_keys)

    tenants = commands.add_parser("tenants", help="set a tenant's limits and fair-share weight")
    tenants.add_argument("tenant")
    tenants.add_argument("--max-running-jobs", type=int)
    tenants.add_argument("--max-gpus", type=int)
    tenants.add_argument("--weight", type=float, default=1.0, help="fair-share weight (default 1)")
    tenants.add_argument("--max-active-jobs", type=int, help="unfinished jobs (validating, queued, running, paused)")
    tenants.add_argument("--max-storage-bytes", type=int, help="bytes of live uploaded files")
    tenants.add_argument("--requests-per-minute", type=int, help="request rate of each key (default: the server's)")
    tenants.set_defaults(handler=cmd_tenants)

    db = commands.add_parser("db", help="migrate the database (TUNEFORGE_DATABASE_URL) to the current schema")
    db.add_argument("action", choices=("upgrade",))
    db.set_defaults(handler=cmd_db)

    simulate = commands.add_parser("simulate", help="replay a month of jobs through the real placement code",
                                   description="Capacity simulation: queue waits, GPU utilization and cost.")
    simulate.add_argument("--jobs", type=int, default=1000)
    simulate.add_argument("--days", type=float, default=30.0)
    simulate.add_argument("--gpus", type=int, default=250)
    simulate.add_argument("--gpus-per-node", type=int, default=8)
    simulate.add_argument("--gpu-type", default="h100-80gb")
    simulate.add_argument("--tenants", type=int, default=5)
    simulate.add_argument("--price", type=float, default=2.50, help="USD per GPU-hour")
    simulate.add_argument("--reserve-after-hours", type=float, default=2.0)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(handler=cmd_simulate)

    from tuneforge.models_cli import add_models_command

    add_models_command(commands)  # the model registry (a module of its own: it is long)

    from tuneforge.datasets_cli import add_datasets_command

    add_datasets_command(commands)  # the dataset registry: named versions of uploaded files

    from tuneforge.storage_cli import add_storage_command

    add_storage_command(commands)  # the object store's tenant keys: rotate, shred; a job's published outputs


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray", "kubernetes"), help="default: TUNEFORGE_EXECUTOR or local")
    parser.add_argument("--gpus", type=int, help="GPUs this worker offers (default: detected with nvidia-smi)")
    parser.add_argument("--gpu-type", help="their type, e.g. a100-80gb (default: detected)")
    parser.add_argument("--cpu-slots", type=int, help="jobs at once on a machine without a GPU (default: cores / 4, at least 1)")
