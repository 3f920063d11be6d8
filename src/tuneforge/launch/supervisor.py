"""Run a recipe in a child process and restart it from its last checkpoint when it dies.

A child that exits 0 succeeded; 75 was preempted after a checkpoint (resumable, not restarted here:
the machine is going away); 2 had bad input (retrying cannot help). Anything else (a crash, SIGKILL
from the out-of-memory killer, a lost node) is restarted up to max_restarts times; the recipe resumes
from the newest verified checkpoint by itself; max_restarts bounds the attempts, so a crash that repeats
at the same step is not retried forever. Stdlib only (no torch): the scheduler can use it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.engine.events import EventReporter, read_events
from tuneforge.launch.commands import recipe_environment
from tuneforge.spec.jobdir import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED


@dataclass
class Attempt:
    exit_code: int
    last_step: int  # last optimizer step the attempt reported (0: none)
    reason: str


@dataclass
class Outcome:
    status: str  # succeeded, preempted, failed
    exit_code: int
    reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def _last_step(job_dir: Path) -> int:
    steps = [e["data"].get("step", 0) for e in read_events(job_dir) if e["type"] == "metrics"]
    return max(steps, default=0)


def _last_error(job_dir: Path, since: int) -> str | None:
    errors = [e for i, e in enumerate(read_events(job_dir)) if i >= since and e["level"] == "error"]
    return errors[-1]["data"].get("error") if errors else None


def supervise(job_dir: Path, command: list[str], *, max_restarts: int, env: dict[str, str] | None = None) -> Outcome:
    """Run command until it succeeds, is preempted, has bad input, or runs out of restarts."""
    events = EventReporter(job_dir)
    attempts: list[Attempt] = []
    interrupts = 0

    def forward(signum, _frame):
        # The child handles the first signal gracefully (checkpoint, exit 75); a second one stops it at once.
        nonlocal interrupts
        interrupts += 1
        if child.poll() is None and signum == signal.SIGTERM:
            child.send_signal(signum)  # a SIGINT from the terminal already reached the whole process group

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            events_before = sum(1 for _ in read_events(job_dir))
            child = subprocess.Popen(command, env={**os.environ, **recipe_environment(env)})
            code = child.wait()
            if code == EXIT_OK:
                return Outcome("succeeded", code, attempts=attempts)
            if code == EXIT_PREEMPTED:
                return Outcome("preempted", code, "stopped on request after a checkpoint", attempts)
            reason = _last_error(job_dir, events_before) or describe_exit(code)
            attempt = Attempt(code, _last_step(job_dir), reason)
            attempts.append(attempt)
            if code == EXIT_BAD_INPUT or interrupts:
                return Outcome("failed", code, reason, attempts)
            if len(attempts) > max_restarts:
                return Outcome("failed", code, f"failed after {len(attempts)} attempts: {reason}", attempts)
            events.emit(
                f"attempt {len(attempts)} {reason}; restarting from the last checkpoint "
                f"({len(attempts)} of {max_restarts} restarts)",
                level="warning", kind="restart", attempt=len(attempts), reason=reason, step=attempt.last_step,
            )
            print(f"tuneforge: {reason}; restarting from the last checkpoint", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
