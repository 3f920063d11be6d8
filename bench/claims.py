"""Claims per second with 8 concurrent worker processes on PostgreSQL, and a check of zero double claims.

    .venv/bin/python bench/claims.py [--jobs 4000] [--workers 8] [--url postgresql+psycopg://postgres@127.0.0.1/postgres]

Creates a scratch database, queues N jobs across 4 tenants, lets W processes claim through the real
claim path (queue.claim_next: plan, SKIP LOCKED, states.claim) until the queue is empty, and prints
claims/s, the per-claim latency p50/p99, and the double-claim count (must be 0). The same run on SQLite
is printed for comparison (one writer at a time there).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter

from sqlalchemy import create_engine, text

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def seed(url: str, jobs: int) -> None:
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.scheduler import states
    from tuneforge.spec import validate_job_spec

    db = Database(url)
    upgrade(db.engine)
    spec = validate_job_spec({"dataset": {"path": "file-x"}})
    with db.session() as session:
        for t in range(4):
            tenant_rows.ensure_tenant(session, tenant_id=f"t{t}")
        for i in range(jobs):
            job = job_rows.create_job(session, tenant_id=f"t{i % 4}", spec=spec, model="tiny-llama", training_file="file-x",
                                      validation_file=None, suffix=None, metadata=None)
            states.admit(session, job_id=job.id)
    db.dispose()


def claimer(url: str, name: str, out) -> None:
    from tuneforge.db.session import Database
    from tuneforge.scheduler.placement import Node
    from tuneforge.scheduler.queue import claim_next

    db = Database(url, pool_size=1)
    nodes = [Node("cpu", 1_000_000)]
    claimed, latencies = [], []
    while True:
        started = time.perf_counter()
        with db.session() as session:
            claim = claim_next(session, worker_id=name, nodes=nodes, free=[1_000_000], lease_seconds=600, now_s=time.time())
        latencies.append(time.perf_counter() - started)
        if claim is None:
            break
        claimed.append((claim.job_id, claim.attempt))
    out.put((name, claimed, latencies[:-1]))
    db.dispose()


def run(url: str, workers: int, jobs: int) -> dict:
    seed(url, jobs)
    queue = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=claimer, args=(url, f"w{i}", queue)) for i in range(workers)]
    started = time.perf_counter()
    for p in processes:
        p.start()
    results = [queue.get() for _ in processes]
    elapsed = time.perf_counter() - started
    for p in processes:
        p.join()
    claims = [c for _, claimed, _ in results for c in claimed]
    latencies = sorted(l for _, _, lat in results for l in lat)
    doubles = sum(n - 1 for n in Counter(claims).values() if n > 1)
    engine = create_engine(url)
    with engine.connect() as connection:
        running, owners = connection.execute(text(
            "SELECT count(*), count(DISTINCT id) FROM jobs WHERE status = 'running' AND lease_owner IS NOT NULL")).one()
    engine.dispose()
    return {"claims": len(claims), "elapsed": elapsed, "per_s": len(claims) / elapsed, "doubles": doubles,
            "running_rows": running, "distinct": owners, "jobs": jobs,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "per_worker": sorted(len(claimed) for _, claimed, _ in results)}


def report(kind: str, r: dict) -> None:
    print(f"{kind:>10}: {r['claims']} claims of {r['jobs']} jobs in {r['elapsed']:.2f}s = {r['per_s']:.0f} claims/s; "
          f"claim latency p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms; double claims {r['doubles']}; "
          f"rows running {r['running_rows']}; per worker {r['per_worker']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--url", default=ADMIN_URL, help="PostgreSQL server (a scratch database is created on it)")
    args = parser.parse_args()
    admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
    name = f"tuneforge_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        pg = run(args.url.rsplit("/", 1)[0] + f"/{name}", args.workers, args.jobs)
        report("postgresql", pg)
        with tempfile.TemporaryDirectory() as tmp:
            lite = run(f"sqlite:///{tmp}/bench.db", args.workers, args.jobs)
            report("sqlite", lite)
        print(f"ratio postgresql / sqlite claims/s: {pg['per_s'] / lite['per_s']:.2f}")
        ok = pg["doubles"] == 0 == lite["doubles"] and pg["claims"] == args.jobs == lite["claims"]
        print("zero double claims, every job claimed once" if ok else "DOUBLE CLAIMS OR LOST JOBS")
        return 0 if ok else 1
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
