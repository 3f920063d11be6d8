"""Start a recipe as a child process that cannot outlive whoever started it.

The child runs in its own process group (so a stop reaches torchrun's workers too) and gets SIGTERM
when its parent dies (Linux PR_SET_PDEATHSIG), so a worker killed outright leaves no recipe behind to
race the next attempt; the recipe treats that SIGTERM like any preemption and writes a checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


def spawn(
    command: list[str], *, env: dict[str, str], log_path: Path | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen:
    """Start command in its own process group, tied to this process's life; output to log_path (appended)
    or, without one, to this process's own stdout and stderr."""
    if log_path is None:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent, pass_fds=pass_fds, close_fds=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent, pass_fds=pass_fds, close_fds=True,
        )


def signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
