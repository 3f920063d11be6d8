"""Failover under load: several `tuneforge server` trees on one PostgreSQL, one process killed with SIGKILL
at a time, and what the jobs and the API clients saw.

    .venv/bin/python bench/failover.py [--servers 2] [--jobs 6] [--kill worker,scheduler,api] [--phase 20]

Starts --servers `tuneforge server --cpu-slots 1` processes (each: the API, a scheduler child, a worker
child) on a scratch PostgreSQL database and one shared TUNEFORGE_HOME (the job folders and uploads a
shared filesystem would hold), with short leases (6 s). A bounded load loop runs against all API
processes, round robin as a load balancer would: --jobs tiny SFT jobs (tiny-llama, a few steps) created
over the run, job lists every 0.25 s, event lists and live event streams. Then, one kind at a time, it
kills -9 one process: `worker` (a worker child running a job; the server restarts it), `scheduler` (a
scheduler child; restarted the same way), `api` (a server's main process: its children get SIGTERM and
hand their jobs back; the bench starts that server again, as an init system would).

It prints: jobs created, finished, failed, lost (acknowledged by the API but never finished, or gone), the
most runs of one job at the same time -- counted from the operating system, by sampling every 0.1 s the
recipe processes whose command line names each job's folder, not from the scheduler's rows -- and the
p50 / p99 of the API's answers in the --phase seconds before each kill, during it (until the process
is back, at least --phase seconds), and after it, with the tries that failed and why (a try that failed
on a dead API process is retried on the next one, as a load balancer would; each try is counted). Everything it makes (database, folders) is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, text

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATA = Path(__file__).resolve().parents[1] / "examples" / "json-extraction" / "train.jsonl"
LEASES = {"TUNEFORGE_LEASE_SECONDS": "6", "TUNEFORGE_HEARTBEAT_SECONDS": "0.5", "TUNEFORGE_POLL_SECONDS": "0.2",
          "TUNEFORGE_STOP_GRACE_SECONDS": "30"}
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `tuneforge server` tree; start() again after a kill brings it back on the same port."""

    def __init__(self, env: dict[str, str], log: Path, cpu_slots: int):
        self.env, self.log_path, self.port, self.cpu_slots = env, log, free_port(), cpu_slots
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.cli", "server", "--port", str(self.port), "--cpu-slots",
                 str(self.cpu_slots)], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server on {self.port} did not become healthy; see {self.log_path}")

    def child(self, name: str) -> int | None:
        try:
            for child in psutil.Process(self.process.pid).children():
                if child.cmdline()[3:4] == [name]:  # python -m tuneforge.cli NAME ...
                    return child.pid
        except psutil.Error:
            pass
        return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Load:
    """The bounded load loop's requests: (time, kind, seconds, failure: None, an HTTP status or an exception's name)."""

    servers: list[Server]
    key: str
    file_id: str
    jobs: int
    create_every: float
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list = field(default_factory=list)
    created: list = field(default_factory=list)
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, kind: str, method: str, path: str, **kwargs) -> httpx.Response | None:
        """One request, to the next server in turn; a failed one is retried on the next (a load balancer's
        retry), and each try is a sample."""
        for _ in range(len(self.servers)):
            with self._lock:
                server = self.servers[self._turn % len(self.servers)]
                self._turn += 1
            start = time.monotonic()
            try:
                answer = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {self.key}"},
                                       timeout=30, **kwargs)
                failure = str(answer.status_code) if answer.status_code >= 500 else None
            except httpx.HTTPError as exc:
                answer, failure = None, type(exc).__name__
            self.samples.append((start, kind, time.monotonic() - start, failure))
            if failure is None:
                return answer
        return None

    def creator(self, body: dict) -> None:
        while len(self.created) < self.jobs and not self.stop.is_set():
            answer = self.call("create", "POST", "/v1/fine_tuning/jobs", json=body)
            if answer is not None and answer.status_code == 200:
                self.created.append(answer.json()["id"])
            self.stop.wait(self.create_every)

    def lister(self) -> None:
        while not self.stop.wait(0.25):
            self.call("list", "GET", "/v1/fine_tuning/jobs", params={"limit": 20})
            if self.created:
                self.call("events", "GET", f"/v1/fine_tuning/jobs/{self.created[-1]}/events", params={"limit": 20})

    def streamer(self) -> None:
        """Follow the newest job's live event stream for up to 3 s at a time; the sample is the time to its headers."""
        while not self.stop.wait(0.5):
            if not self.created:
                continue
            server = self.servers[self._turn % len(self.servers)]
            start = time.monotonic()
            try:
                with httpx.stream("GET", f"{server.url}/v1/fine_tuning/jobs/{self.created[-1]}/events/stream",
                                  headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as answer:
                    failure = str(answer.status_code) if answer.status_code >= 500 else None
                    self.samples.append((start, "stream", time.monotonic() - start, failure))
                    until = time.monotonic() + 3
                    for _ in answer.iter_lines():
                        if time.monotonic() > until or self.stop.is_set():
                            break
            except httpx.HTTPError as exc:
                self.samples.append((start, "stream", time.monotonic() - start, type(exc).__name__))


class RunSampler:
    """Recipe processes per job, from the OS: the most of one job's runs alive at the same time."""

    def __init__(self, jobs_dir: Path):
        self.marker, self.most, self.stop = str(jobs_dir) + os.sep, defaultdict(int), threading.Event()

    def running(self) -> dict[str, list[psutil.Process]]:
        found = defaultdict(list)
        for process in psutil.process_iter(["cmdline"]):
            for arg in process.info["cmdline"] or ():
                if arg.startswith(self.marker):
                    found[arg[len(self.marker):].split(os.sep)[0]].append(process)
                    break
        return found

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for job_id, processes in self.running().items():
                self.most[job_id] = max(self.most[job_id], len(processes))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def window(samples: list, start: float, end: float) -> str:
    inside = [s for s in samples if start <= s[0] < end]
    ok = [s[2] * 1000 for s in inside if s[3] is None]
    failed = defaultdict(int)
    for sample in inside:
        if sample[3] is not None:
            failed[f"{sample[1]} {sample[3]}"] += 1
    why = f" ({', '.join(f'{n} {what}' for what, n in sorted(failed.items()))})" if failed else ""
    return (f"{len(inside):4d} tries  p50 {percentile(ok, 0.5):7.1f} ms  p99 {percentile(ok, 0.99):7.1f} ms  "
            f"failed {len(inside) - len(ok)}{why}")


def back_again(kind: str, pid: int, server: Server, timeout: float = 300) -> None:
    """Until the killed process's replacement is up: the server's new child, or the restarted API."""
    if kind == "api":
        server.process.wait()
        server.start()  # as an init system would; its old children stop on SIGTERM and hand their jobs back
        server.wait_healthy()
        return
    deadline = time.monotonic() + timeout
    while server.child(kind) in (None, pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_one(kind: str, servers: list[Server], sampler: RunSampler) -> tuple[int, Server]:
    """SIGKILL one process of this kind; the worker chosen is one that runs a job when there is one."""
    if kind == "worker":
        busy = {p.ppid() for processes in sampler.running().values() for p in processes}
        server = next((s for s in servers if s.child("worker") in busy), servers[0])
        pid = server.child("worker")
    elif kind == "scheduler":
        server = servers[0]
        pid = server.child("scheduler")
    else:
        server = servers[-1]
        pid = server.process.pid
    os.kill(pid, signal.SIGKILL)
    return pid, server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per job (checkpoint every 2)")
    parser.add_argument("--kill", default="worker,scheduler,api")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds before / during / after each kill")
    parser.add_argument("--finish-timeout", type=float, default=900.0)
    args = parser.parse_args()
    kinds = [k for k in args.kill.split(",") if k]
    unknown = set(kinds) - {"worker", "scheduler", "api"}
    if unknown:
        parser.error(f"--kill: unknown {sorted(unknown)}; expected worker, scheduler, api")

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tuneforge_failover_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-failover-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        env = {**os.environ, **LEASES, "TUNEFORGE_HOME": str(home), "TUNEFORGE_DATABASE_URL": url, "OMP_NUM_THREADS": "1"}
        try:
            report = run(args, kinds, env, home, url, servers)
        finally:
            for server in servers:
                server.stop()
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(report)
    return 0


def run(args, kinds: list[str], env: dict, home: Path, url: str, servers: list[Server]) -> str:
    key = subprocess.run([sys.executable, "-m", "tuneforge.cli", "keys", "create", "--tenant", "bench"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    for index in range(args.servers):
        servers.append(Server(env, home / f"server-{index}.log", cpu_slots=1))
        servers[-1].start()
        servers[-1].wait_healthy()  # one at a time: the first creates the admin key, the rest find it
    headers = {"Authorization": f"Bearer {key}"}
    with open(DATA, "rb") as handle:
        file = httpx.post(servers[0].url + "/v1/files", headers=headers, files={"file": ("train.jsonl", handle)},
                          data={"purpose": "fine-tune"}, timeout=60).json()
    while httpx.get(f"{servers[0].url}/v1/files/{file['id']}", headers=headers, timeout=30).json()["status"] != "processed":
        time.sleep(0.3)
    body = {"model": "tiny-llama", "training_file": file["id"], "tuneforge": {
        "dataset": {"max_seq_length": 256}, "training": {"max_steps": args.steps, "per_device_batch_size": 2},
        "checkpoint": {"every_steps": 2}, "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}}

    span = args.phase * (2 * len(kinds) + 1)
    load = Load(servers=servers, key=key, file_id=file["id"], jobs=args.jobs, create_every=span / max(1, args.jobs))
    sampler = RunSampler(home / "jobs")
    threads = [threading.Thread(target=load.creator, args=(body,), daemon=True),
               threading.Thread(target=load.lister, daemon=True), threading.Thread(target=load.streamer, daemon=True),
               threading.Thread(target=sampler.run, daemon=True)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while not sampler.running() and time.monotonic() - started < 300:  # the first recipe is up: kills hit work
        time.sleep(0.2)
    time.sleep(args.phase)
    kills = []
    for kind in kinds:
        at = time.monotonic()
        pid, server = kill_one(kind, servers, sampler)
        back_again(kind, pid, server)
        kills.append((kind, pid, at, time.monotonic()))
        time.sleep(max(0.0, at + 2 * args.phase - time.monotonic(), kills[-1][3] + args.phase - time.monotonic()))

    deadline = time.monotonic() + args.finish_timeout
    while time.monotonic() < deadline and len(load.created) < args.jobs:
        time.sleep(0.5)
    load.stop.set()
    engine = create_engine(url)
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            rows = dict(connection.execute(text("SELECT id, status FROM jobs")).all())
        if all(rows.get(job_id) in TERMINAL for job_id in load.created):
            break
        time.sleep(1)
    time.sleep(0.5)
    sampler.stop.set()
    with engine.connect() as connection:
        rows = {r.id: r for r in connection.execute(text("SELECT id, status, attempt, restarts FROM jobs"))}
        starts = dict(connection.execute(text(
            "SELECT job_id, count(*) FROM job_events WHERE message LIKE 'Fine-tuning job started%' GROUP BY job_id")).all())
        audit = [r.object_id for r in connection.execute(text(
            "SELECT object_id FROM audit_log WHERE action LIKE 'SERVER %' ORDER BY seq"))]
    engine.dispose()
    return report(args, load, sampler, rows, starts, audit, kills)


def report(args, load: Load, sampler: RunSampler, rows: dict, starts: dict, audit: list, kills: list) -> str:
    statuses = [rows[j].status if j in rows else "missing" for j in load.created]
    lost = [j for j, s in zip(load.created, statuses) if s not in TERMINAL]
    lines = [f"failover: {args.servers} servers (API + scheduler + worker each, --cpu-slots 1) on one PostgreSQL, "
             f"leases 6 s; {args.jobs} tiny-llama jobs of {args.steps} steps",
             f"jobs created {len(load.created)}  finished {statuses.count('succeeded')}  failed {statuses.count('failed')}  "
             f"lost {len(lost)}" + (f" ({', '.join(lost)})" if lost else "")
             + f"  (in the database without an answer to their client: {len(set(rows) - set(load.created))})",
             f"max concurrent runs of one job (OS processes, sampled every 0.1 s): "
             f"{max((sampler.most[j] for j in load.created), default=0)}",
             f"runs launched per job (the jobs' 'started' events): {sorted(starts.get(j, 0) for j in load.created)}; "
             f"attempts: {sorted(rows[j].attempt for j in load.created if j in rows)}"]
    for kind, pid, at, back in kills:
        who = "the bench (as an init system would)" if kind == "api" else "its server"
        lines.append(f"kill -9 {kind} (pid {pid}), back up in {back - at:.1f} s, restarted by {who}")
        during = max(back, at + args.phase)  # the outage, and at least one phase
        for label, start, end in (("before", at - args.phase, at), ("during", at, during),
                                  ("after ", during, during + args.phase)):
            lines.append(f"  {label} {window(load.samples, start, end)}")
    lines.append("server restart records (audit log, action SERVER): " + (json.dumps(audit, indent=1) if audit else "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
