"""Run a background loop's run_once() until SIGTERM or SIGINT (or a stop event), one tick at a time; run
several loops side by side, as `tuneforge scheduler` does."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("tuneforge.scheduler")
JOIN_GRACE_S = 10.0  # how long a stop waits for the loops to finish their tick


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (main thread only; elsewhere the caller sets it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())


def run_until_stopped(run_once: Callable[[], None], *, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            run_once()
        except Exception:  # a database blip must not end the loop; the next tick retries
            log.exception("tick failed; retrying")
        stop.wait(interval)


def run_loops(loops: list, *, stop: threading.Event, grace_s: float = JOIN_GRACE_S) -> None:
    """Run each loop's run(stop) in a thread of its own until stop is set (by SIGTERM, in the main thread).

    Each loop finishes its tick and returns; one stuck past grace_s (a database call that never answers)
    is left behind, logged, so that a stop request always ends the process (its threads are daemons)."""
    threads = [threading.Thread(target=loop.run, args=(stop,), name=type(loop).__name__, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    while not stop.wait(0.5):
        pass
    deadline = time.monotonic() + grace_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        log.warning("stopping with %s still busy after %.0f s", ", ".join(stuck), grace_s)
