"""Training tokens/s with the API server busy beside it, next to training alone, for each way of sharing cores.

    .venv/bin/python bench/training_beside_api.py [--steps 12] [--rate 20] [--variants ...]

On the embedded default the API server, the scheduler and the recipe share one machine. torch's OpenMP
threads wait for each other at every parallel region; when the OS preempts one of them for the API
server, the others wait (measured earlier: elementwise ops ~12x slower with 2 threads than 1 beside a busy
server). This bench starts a real `tuneforge server --no-worker` (SQLite, a temporary home, 200 jobs),
drives it from a client at a bounded rate (--rate requests/s: job lists, job gets and event pages, what a
dashboard and a CLI poll), and trains the bundled SmolLM2-135M-Instruct (LoRA, json-extraction, --steps
steps, evaluation off) once alone and once beside that load for each variant:

- `2 threads`: OMP_NUM_THREADS = all cores, no pinning (what the local executor did before).
- `2 threads passive`: the same with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep instead of spinning).
- `cores-1 pinned`: the recipe pinned to all cores but the first with that many threads, the server and the
  load client pinned to the first (what the local executor does when it leaves the control plane a core).

It prints the median real tokens/s of the training loop (step 1 left out), the ratio of loaded to alone,
and the API's p50 / p99 under each. Run it alone on the machine: the ratios are what matter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "json-extraction"
CORES = sorted(os.sched_getaffinity(0))
VARIANTS = {
    "2 threads": {"threads": len(CORES), "env": {}, "recipe_cores": None},
    "2 threads passive": {"threads": len(CORES), "env": {"OMP_WAIT_POLICY": "PASSIVE"}, "recipe_cores": None},
    "cores-1 pinned": {"threads": max(1, len(CORES) - 1), "env": {}, "recipe_cores": CORES[1:] or CORES},
}


def seed(home: Path) -> tuple[str, list[str]]:
    """A database with a tenant, its key and 200 jobs with events, in `home`."""
    os.environ["TUNEFORGE_HOME"] = str(home)
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.job_events import add_event
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.settings import Settings
    from tuneforge.spec import validate_job_spec

    db = Database(Settings.from_env().database_url)
    upgrade(db.engine)
    ids = []
    with db.session() as session:
        _, secret = tenant_rows.create_api_key(session, tenant_id="bench")
        spec = validate_job_spec({"dataset": {"path": "file-0"}, "model": {"base_model": "tiny-llama"}})
        for i in range(200):
            job = job_rows.create_job(session, tenant_id="bench", spec=spec, model="tiny-llama", training_file="file-0",
                                      validation_file=None, suffix=None, metadata={"i": str(i)})
            ids.append(job.id)
            for step in range(10 if i % 10 == 0 else 0):
                add_event(session, job_id=job.id, type="metrics", message=f"step {step}", data={"step": step})
    db.dispose()
    return secret, ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, cores: list[int] | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "10000000",
           "TUNEFORGE_RATE_LIMIT_BURST": "10000000"}
    server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "server", "--no-worker", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


class Load(threading.Thread):
    """Requests at a bounded rate (one client, paced), latencies kept."""

    def __init__(self, base: str, key: str, job_ids: list[str], rate: float):
        super().__init__(daemon=True)
        self.base, self.key, self.job_ids, self.interval = base, key, job_ids, 1 / rate
        self.latencies: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=60) as http:
            calls = [lambda: http.get("/v1/fine_tuning/jobs", params={"limit": 20}),
                     lambda: http.get(f"/v1/fine_tuning/jobs/{rng.choice(self.job_ids)}"),
                     lambda: http.get(f"/v1/fine_tuning/jobs/{rng.choice(self.job_ids[::10])}/events")]
            next_at = time.perf_counter()
            while not self.stopping.is_set():
                t0 = time.perf_counter()
                response = rng.choice(calls)()
                self.latencies.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text
                next_at += self.interval
                time.sleep(max(0.0, next_at - time.perf_counter()))


def train(work: Path, name: str, variant: dict, steps: int) -> float:
    job_dir = work / name.replace(" ", "-")
    spec = job_dir.with_suffix(".yaml")
    spec.write_text(f"dataset: {{path: {DATA / 'train.jsonl'}, validation_path: {DATA / 'val.jsonl'}}}\n"
                    f"training: {{max_steps: {steps}, batch_size: 8, seed: 1}}\n"
                    "evaluation: {metrics: [loss], eval_before_training: false, max_eval_examples: 8}\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(variant["threads"]), **variant["env"]}
    env.pop("TUNEFORGE_HOME", None)
    cores = variant["recipe_cores"]
    with open(job_dir.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(spec), "--job-dir", str(job_dir)], env=env,
                       stdout=subprocess.DEVNULL, stderr=log, check=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    rates = [json.loads(line)["data"].get("tokens_per_second") for line in (job_dir / "events.jsonl").open()
             if json.loads(line).get("type") == "metrics"]
    steps_rates = [r for r in rates if r][1:]
    return statistics.median(steps_rates)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rate", type=float, default=20.0, help="API requests per second during the loaded runs")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-beside-api-") as tmp:
        work = Path(tmp)
        key, job_ids = seed(work / "home")
        for name in args.variants.split(","):
            variant = VARIANTS[name]
            alone = train(work, f"{name} alone", variant, args.steps)
            server_cores = [CORES[0]] if variant["recipe_cores"] else None
            server, base = start_server(work / "home", server_cores)
            if server_cores:
                os.sched_setaffinity(0, server_cores)  # the load client beside the server, off the recipe's cores
            load = Load(base, key, job_ids, args.rate)
            load.start()
            try:
                loaded = train(work, f"{name} loaded", variant, args.steps)
            finally:
                load.stopping.set()
                load.join()
                os.sched_setaffinity(0, CORES)
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
            rows.append((name, alone, loaded, load.latencies))
            print(f"{name}: alone {alone:.0f}, loaded {loaded:.0f} tokens/s", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct LoRA, json-extraction, {args.steps} steps of 8 examples; API load "
          f"{args.rate:g} requests/s on {len(CORES)} cores\n")
    print("| variant | tokens/s alone | tokens/s beside the API | ratio | API p50 | API p99 | requests |")
    print("|---|---|---|---|---|---|---|")
    for name, alone, loaded, latencies in rows:
        print(f"| {name} | {alone:.0f} | {loaded:.0f} | {loaded / alone:.2f} | {1000 * percentile(latencies, 0.5):.0f} ms "
              f"| {1000 * percentile(latencies, 0.99):.0f} ms | {len(latencies)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
