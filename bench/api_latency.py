"""API latency with 10,000 jobs on PostgreSQL under concurrent loopback clients.

    .venv/bin/python bench/api_latency.py [--jobs 10000] [--clients 8] [--rounds 40]

Creates a scratch database with N jobs (and 20 events for every 20th job), starts a real `tuneforge
server --no-worker` on a loopback port, and has C client threads each run R rounds of create, get, list
(first page, 20 jobs) and events (20 newest); prints p50 / p99 per operation and requests/s. Bounded in
count; everything it makes is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATA = Path(__file__).resolve().parents[1] / "examples" / "json-extraction" / "train.jsonl"


def seed(url: str, jobs: int, home: Path) -> tuple[str, str, list[str]]:
    os.environ["TUNEFORGE_HOME"] = str(home)
    from tuneforge.db import files as file_rows
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.job_events import add_event
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.datasets import inspect_dataset
    from tuneforge.scheduler import states
    from tuneforge.spec import validate_job_spec

    db = Database(url)
    upgrade(db.engine)
    store = LocalArtifactStore(home / "artifacts")
    with open(DATA, "rb") as handle, store.staging(handle, filename="train.jsonl", max_bytes=1 << 30) as staged:
        report = inspect_dataset(staged.path, display_name="train.jsonl")
        store.commit(staged)
    ids = []
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="bench")
        for other in range(3):
            tenant_rows.ensure_tenant(session, tenant_id=f"other-{other}")
        file = file_rows.create_file(session, tenant_id="bench", filename="train.jsonl", purpose="fine-tune",
                                     size=staged.size, sha256=staged.sha256, report=report.model_dump(mode="json"),
                                     status="processed", status_details=None)
        spec = validate_job_spec({"dataset": {"path": file.id}, "model": {"base_model": "tiny-llama"}})
        for i in range(jobs):
            tenant = "bench" if i % 4 == 0 else f"other-{i % 3}"
            job = job_rows.create_job(session, tenant_id=tenant, spec=spec, model="tiny-llama", training_file=file.id,
                                      validation_file=None, suffix=None, metadata={"i": str(i)})
            states.admit(session, job_id=job.id)
            if tenant == "bench":
                ids.append(job.id)
                if i % 20 == 0:
                    for step in range(20):
                        add_event(session, job_id=job.id, type="metrics", message=f"step {step}",
                                  data={"step": step, "train_loss": 1.0 / (step + 1)})
            if i % 1000 == 999:
                session.flush()
    db.dispose()
    return secret, file.id, ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--url", default=ADMIN_URL)
    args = parser.parse_args()
    admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
    name = f"tuneforge_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = args.url.rsplit("/", 1)[0] + f"/{name}"
    server = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            started = time.perf_counter()
            key, file_id, job_ids = seed(url, args.jobs, home)
            print(f"seeded {args.jobs} jobs ({len(job_ids)} of the benchmark tenant) in {time.perf_counter() - started:.1f}s")
            port = free_port()
            # A rate no client here reaches: each request still pays for its token, none is refused.
            env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_DATABASE_URL": url,
                   "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "10000000", "TUNEFORGE_RATE_LIMIT_BURST": "10000000"}
            server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "server", "--no-worker", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            with_events = job_ids[::5]
            latencies: dict[str, list[float]] = {"create": [], "get": [], "list": [], "events": []}
            lock = threading.Lock()

            def client(seed_: int) -> None:
                rng = random.Random(seed_)
                headers = {"Authorization": f"Bearer {key}"}
                with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
                    for _ in range(args.rounds):
                        calls = [
                            ("create", lambda: http.post("/v1/fine_tuning/jobs", json={
                                "model": "tiny-llama", "training_file": file_id, "tuneforge": {"training": {"max_steps": 1}}})),
                            ("get", lambda: http.get(f"/v1/fine_tuning/jobs/{rng.choice(job_ids)}")),
                            ("list", lambda: http.get("/v1/fine_tuning/jobs", params={"limit": 20})),
                            ("events", lambda: http.get(f"/v1/fine_tuning/jobs/{rng.choice(with_events)}/events",
                                                        params={"limit": 20})),
                        ]
                        for op, call in calls:
                            t0 = time.perf_counter()
                            response = call()
                            elapsed = time.perf_counter() - t0
                            assert response.status_code == 200, response.text
                            with lock:
                                latencies[op].append(elapsed)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            t0 = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - t0
            total = sum(len(v) for v in latencies.values())
            print(f"{args.clients} concurrent clients x {args.rounds} rounds against {args.jobs} jobs on PostgreSQL: "
                  f"{total} requests in {wall:.1f}s = {total / wall:.0f} req/s")
            for op, values in latencies.items():
                values.sort()
                p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
                print(f"  {op:>7}: n={len(values)}  p50 {1000 * statistics.median(values):6.1f} ms  p99 {1000 * p99:6.1f} ms")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
