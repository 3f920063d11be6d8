"""Run a background loop's run_once() until SIGTERM or SIGINT (or a stop event), one tick at a time; run
several loops side by side, as `tuneforge scheduler` does."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("tuneforge.scheduler")


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


def run_loops(loops: list, *, stop: threading.Event) -> None:
    """Run each loop's run(stop) in a thread of its own until stop is set (by SIGTERM, in the main thread)."""
    threads = [threading.Thread(target=loop.run, args=(stop,), name=type(loop).__name__, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    while not stop.wait(0.5):
        pass
    for thread in threads:
        thread.join()
