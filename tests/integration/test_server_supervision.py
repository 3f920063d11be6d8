"""`tuneforge server` restarts the children that die (api/supervisor.py): a worker killed with SIGKILL comes
back as a new process, with a log line and an audit record; a child that keeps crashing waits longer
each time (1, 2, 4 ... capped), and one that had stayed up resets the count."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import psutil
import pytest
from conftest import ServerProcess

from tuneforge.api.supervisor import RestartPolicy, Supervisor


def run_supervisor(supervisor: Supervisor, until, timeout: float = 30.0) -> list:
    """Drive check() (as the watch thread does) until `until(exits)` holds."""
    exits, deadline = [], time.monotonic() + timeout
    while not until(exits):
        assert time.monotonic() < deadline, f"the supervisor recorded only {exits}"
        exits += supervisor.check(time.monotonic())
        time.sleep(0.02)
    return exits


def test_the_backoff_doubles_for_a_child_that_keeps_crashing_up_to_the_cap():
    supervisor = Supervisor({"crasher": [sys.executable, "-c", "raise SystemExit(3)"]}, env=dict(os.environ),
                            policy=RestartPolicy(base_s=0.1, cap_s=0.4, stable_s=30))
    for child in supervisor.children:
        supervisor._spawn(child, time.monotonic())  # start() without the watch thread: this test drives check()
    try:
        exits = run_supervisor(supervisor, lambda exits: len(exits) >= 5)
    finally:
        supervisor.stop(grace_s=5)
    assert [e.delay_s for e in exits[:5]] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert [e.crashes for e in exits[:5]] == [1, 2, 3, 4, 5] and all(e.code == 3 for e in exits)
    assert len({e.pid for e in exits}) == len(exits)  # each one a new process


def test_a_child_that_had_stayed_up_starts_its_backoff_over():
    supervisor = Supervisor({"flaky": [sys.executable, "-c", "import time; time.sleep(0.6)"]}, env=dict(os.environ),
                            policy=RestartPolicy(base_s=0.1, cap_s=10, stable_s=0.3))
    for child in supervisor.children:
        supervisor._spawn(child, time.monotonic())
    try:
        exits = run_supervisor(supervisor, lambda exits: len(exits) >= 3)
    finally:
        supervisor.stop(grace_s=5)
    assert [e.crashes for e in exits] == [1, 1, 1] and [e.delay_s for e in exits] == [0.1, 0.1, 0.1]
    assert all(e.ran_s >= 0.3 for e in exits)


def children_of(server: ServerProcess) -> dict[str, int]:
    found = {}
    for child in psutil.Process(server.process.pid).children():
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        for name in ("worker", "scheduler"):
            if name in command[3:4]:  # python -m tuneforge.cli NAME ...
                found[name] = child.pid
    return found


def wait_for(condition, timeout: float, what: str, server: ServerProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}\n{server.log_text()[-3000:]}")


@pytest.mark.parametrize("kind", ["worker", pytest.param("scheduler", marks=pytest.mark.slow)])
def test_the_server_restarts_a_child_killed_with_sigkill_and_records_it(tmp_path, kind):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'tuneforge.db'}")
    try:
        before = wait_for(lambda: (c := children_of(server)).get(kind) and c, 30, "no child process", server)
        os.kill(before[kind], signal.SIGKILL)
        after = wait_for(lambda: (pid := children_of(server).get(kind)) and pid != before[kind] and pid, 30,
                         f"the {kind} was not restarted", server)
        assert psutil.Process(after).is_running()
        admin = (server.home / "admin-key").read_text().strip()
        records = httpx.get(server.url + "/v1/tuneforge/audit", params={"action": "SERVER"},
                            headers={"Authorization": f"Bearer {admin}"}, timeout=30).json()["data"]
        assert len(records) == 1, records
        record = records[0]
        assert record["action"] == f"SERVER restart {kind}" and record["status"] == 503
        assert f"(pid {before[kind]}) killed by SIGKILL" in record["object_id"] and "restart in 1 s" in record["object_id"]
        log = server.log_text()
        assert f"server child {kind} (pid {before[kind]}) killed by SIGKILL" in log and f"restarted {kind} (pid {after})" in log
        assert server.process.poll() is None  # the API itself stayed up throughout
    finally:
        server.stop()
