"""Graceful stop requests: SIGTERM / SIGINT and spot-instance notices.

The first request lets the current optimizer step finish, then the recipe checkpoints and exits with
EXIT_PREEMPTED (spec/jobdir.py); a second signal exits at once (the checkpoints on disk are atomic, so nothing is torn).
Spot notices are host configuration, never part of a job spec (a spec must not run commands):
  TUNEFORGE_SPOT_NOTICE_FILE      preempt when this file appears
  TUNEFORGE_SPOT_NOTICE_COMMAND   preempt when this shell command exits 0 (polled in a thread)
  TUNEFORGE_SPOT_NOTICE_INTERVAL  seconds between polls of the command (default 5)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path


class Preempted(Exception):
    """Raised by a recipe after it saved a checkpoint in answer to a stop request."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"preempted at step {step} ({reason}); the job resumes from its checkpoint")
        self.step, self.reason = step, reason


class PreemptionWatcher:
    """Collects stop requests; the training loop asks `requested` at every step boundary."""

    def __init__(self, *, notice_file: str | None = None, notice_command: str | None = None, interval_s: float = 5.0):
        self.reason: str | None = None
        self.notice_file = Path(notice_file) if notice_file else None
        self.notice_command = notice_command
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._previous: dict[int, object] = {}

    @classmethod
    def from_environment(cls) -> PreemptionWatcher:
        return cls(
            notice_file=os.environ.get("TUNEFORGE_SPOT_NOTICE_FILE"),
            notice_command=os.environ.get("TUNEFORGE_SPOT_NOTICE_COMMAND"),
            interval_s=float(os.environ.get("TUNEFORGE_SPOT_NOTICE_INTERVAL", "5")),
        )

    def _on_signal(self, signum, _frame) -> None:
        if self.reason is not None:
            # Second request: stop now. Checkpoints are committed atomically, so exiting mid-step is safe.
            os._exit(128 + signum)
        self.reason = signal.Signals(signum).name

    def install(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.notice_command:
            threading.Thread(target=self._poll_command, name="spot-notice", daemon=True).start()
        return self

    def uninstall(self) -> None:
        self._stop.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _poll_command(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                done = subprocess.run(self.notice_command, shell=True, capture_output=True, timeout=self.interval_s * 4)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0 and self.reason is None:
                self.reason = "spot notice (command)"
                return

    @property
    def requested(self) -> bool:
        if self.reason is None and self.notice_file is not None and self.notice_file.exists():
            self.reason = f"spot notice ({self.notice_file})"
        return self.reason is not None
