"""Lease takeover on PostgreSQL: two `tuneforge worker` processes, the one running a job killed with SIGKILL
mid-job; its recipe stops (SIGTERM from PR_SET_PDEATHSIG, a checkpoint), the lease runs out, the reaper
re-queues the job and the other worker resumes it from the checkpoint. The job succeeds once, and the
operating system never shows two of its recipe processes at the same time."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict

import httpx
import psutil
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

pytestmark = pytest.mark.slow


def recipes_of(jobs_dir) -> dict[str, list[psutil.Process]]:
    marker, found = str(jobs_dir) + os.sep, defaultdict(list)
    for process in psutil.process_iter(["cmdline"]):
        for arg in process.info["cmdline"] or ():
            if arg.startswith(marker):
                found[arg[len(marker):].split(os.sep)[0]].append(process)
                break
    return found


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_job_whose_worker_is_killed_finishes_once_on_the_other_worker(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", database_url, worker=False)
    most, stop = defaultdict(int), threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for job_id, processes in recipes_of(server.home / "jobs").items():
                most[job_id] = max(most[job_id], len(processes))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        workers = [server.start_worker(), server.start_worker()]
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"},
                            timeout=30)
        file = wait_validated(http, post_file(http, EXAMPLE_DATA / "train.jsonl")["id"])
        job = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"], "tuneforge": {
            "dataset": {"max_seq_length": 256}, "training": {"max_steps": 12, "per_device_batch_size": 2},
            "checkpoint": {"every_steps": 2}, "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}}).json()
        sampler.start()
        deadline = time.monotonic() + 300
        while True:  # the job past its first checkpoint: killing its worker now loses work unless it resumes
            events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
            if any((e.get("data") or {}).get("kind") == "checkpoint" for e in events):
                break
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.3)
        recipe = recipes_of(server.home / "jobs")[job["id"]]
        assert len(recipe) == 1
        victim = next(w for w in workers if w.pid == recipe[0].ppid())
        os.kill(victim.pid, signal.SIGKILL)

        deadline = time.monotonic() + 600
        while (done := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.5)
        assert done["status"] == "succeeded", done["error"]
        assert done["tuneforge"]["attempt"] == 2  # re-queued once, by the reaper, after the lease ran out
        events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
        requeued = [e for e in events if "its worker stopped renewing the lease" in e["message"]]
        started = [e for e in events if e["message"].startswith("Fine-tuning job started")]
        succeeded = [e for e in events if e["message"] == "The job has successfully completed"]
        assert len(requeued) == 1 and len(started) == 2 and len(succeeded) == 1
        assert any((e.get("data") or {}).get("kind") == "resumed" for e in events)  # from the checkpoint, not step 0
        assert most[job["id"]] == 1  # never two runs of the job at once
    finally:
        stop.set()
        server.stop()
