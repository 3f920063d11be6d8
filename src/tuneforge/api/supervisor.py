"""`tuneforge server`'s children (the scheduler, the local worker), restarted when they die.

A child that exits while the server is up is started again after a backoff: 1 s after its first crash,
then doubling (2, 4, 8 ... s) up to 60 s for a child that keeps crashing; a child that had run for 60 s
or more before it died counts as recovered, and its next crash waits 1 s again. Each exit is a log line
and an audit record (action `SERVER restart <child>`, status 503, the object names the child, how it
ended and when it comes back), so an operator sees it in GET /v1/tuneforge/audit?action=SERVER.

What a restart relies on: a killed worker's recipes get SIGTERM (PR_SET_PDEATHSIG, executors/process.py)
and checkpoint; its jobs' leases run out and the reaper re-queues them; the job directory's lock keeps a
new run out until the old recipe has exited. A killed scheduler lost nothing: its loops are idempotent.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.scheduler.executors.process import spawn

log = logging.getLogger("tuneforge.server")
CHECK_SECONDS = 0.5  # how often the supervisor looks at its children


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff, capped; reset once a child has stayed up for stable_s."""

    base_s: float = 1.0
    cap_s: float = 60.0
    stable_s: float = 60.0

    def delay(self, crashes: int) -> float:
        """The wait before restarting a child after its crashes-th crash in a row (1, 2, ...)."""
        return min(self.cap_s, self.base_s * 2 ** max(0, crashes - 1))


@dataclass(frozen=True)
class ChildExit:
    """One death of a child, as the supervisor recorded it."""

    name: str
    pid: int
    code: int
    ran_s: float
    crashes: int  # in a row, this one included
    delay_s: float  # until the restart

    def describe(self) -> str:
        if self.code < 0:
            try:
                how = f"killed by {signal.Signals(-self.code).name}"
            except ValueError:
                how = f"killed by signal {-self.code}"
        else:
            how = f"exited with code {self.code}"
        return (f"{self.name} (pid {self.pid}) {how} after {self.ran_s:.1f} s; restart in {self.delay_s:g} s "
                f"(crash {self.crashes} in a row)")


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    crashes: int = 0
    restart_at: float | None = None  # set while the child is down, waiting out its backoff
    exits: list[ChildExit] = field(default_factory=list)


class Supervisor:
    """Starts the children, watches them from a thread of its own, and restarts the ones that die."""

    def __init__(self, commands: dict[str, list[str]], *, env: dict[str, str], policy: RestartPolicy = RestartPolicy(),
                 on_exit: Callable[[ChildExit], None] | None = None):
        self.children = [Child(name, command) for name, command in commands.items()]
        self.env, self.policy, self.on_exit = env, policy, on_exit
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # check() and stop() never touch a child at the same time
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for child in self.children:
            self._spawn(child, time.monotonic())
        self._thread = threading.Thread(target=self._watch, name="Supervisor", daemon=True)
        self._thread.start()

    def pids(self) -> dict[str, int | None]:
        return {c.name: (c.process.pid if c.process is not None and c.process.poll() is None else None)
                for c in self.children}

    def check(self, now: float) -> list[ChildExit]:
        """Record the children that died since the last check, and restart those whose backoff is over."""
        exits = []
        with self._lock:
            if self._stopping.is_set():
                return exits
            for child in self.children:
                if child.restart_at is None and child.process is not None and child.process.poll() is not None:
                    exits.append(self._died(child, now))
                elif child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child, now)
                    log.warning("restarted %s (pid %d)", child.name, child.process.pid)
        for death in exits:
            log.warning("server child %s", death.describe())
            if self.on_exit is not None:
                try:
                    self.on_exit(death)
                except Exception:  # a database blip must not stop the restarts
                    log.exception("could not record the exit of %s", death.name)
        return exits

    def stop(self, grace_s: float) -> None:
        """No more restarts; SIGTERM the children and wait up to grace_s for them (then SIGKILL)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def _watch(self) -> None:
        while not self._stopping.wait(CHECK_SECONDS):
            self.check(time.monotonic())

    def _spawn(self, child: Child, now: float) -> None:
        # Restarts fork from the watch thread; PR_SET_PDEATHSIG fires when the forking *thread* ends, and
        # this one lives until stop(), which stops the children anyway.
        child.process, child.started, child.restart_at = spawn(child.command, env=self.env), now, None

    def _died(self, child: Child, now: float) -> ChildExit:
        ran = now - child.started
        child.crashes = 1 if ran >= self.policy.stable_s else child.crashes + 1
        delay = self.policy.delay(child.crashes)
        child.restart_at = now + delay
        death = ChildExit(name=child.name, pid=child.process.pid, code=child.process.returncode, ran_s=ran,
                          crashes=child.crashes, delay_s=delay)
        child.exits.append(death)
        return death
